"""The digits accuracy–throughput frontier (issue 18), phases of ``bench/pareto.py``: ``accuracy`` (train,
fine-tune, evaluate; per-seed JSONs), ``timing`` (interleaved images/s), ``report`` (merge, statistics),
``plot``, and ``variants`` (PM structure-search and fine-tuning variants)."""
