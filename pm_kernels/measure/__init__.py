"""Measurement, written once for the pipeline, the demo, the quick start and every benchmark script.

    macs     multiply-accumulates: analytic (dense or PM structure, ``pm_macs``) and traced (FlopCounterMode)
    timing   interleaved rounds of the models compared (wall and CPU time, median and spread), and the record of
             the environment a figure was measured in (device, versions, threads, load, date, command)
"""
from .macs import analytic_macs, kept_tokens, pm_macs, traced_macs
from .timing import Rates, environment, finish_environment, forward, free_cores, time_interleaved

__all__ = ["analytic_macs", "environment", "finish_environment", "forward", "free_cores", "kept_tokens", "pm_macs",
           "Rates", "time_interleaved", "traced_macs"]
