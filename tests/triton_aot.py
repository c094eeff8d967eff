"""Compile the package's Triton kernels ahead of time for a GPU that this machine does not have.

The CPU tests run the kernels under ``TRITON_INTERPRET=1``, which accepts programs the real compiler
rejects (tl.dot shape / dtype rules, layouts) and never allocates shared memory or registers. This helper
drives the real launchers (``attention_fwd`` / ``attention_bwd`` and the token-op autograd Functions) on
CPU tensors with every kernel replaced by a recorder, so it sees the exact arguments and block sizes the
launchers would use on a GPU (interpreter-only settings switched off, 132 SMs assumed), then compiles each
recorded launch, and every config of the autotuned ones, with ``triton.compile`` for sm_90 (Hopper) down to
a cubin, and reads its resource use with the ``cuobjdump`` that ships with Triton.

It proves that the kernels compile and fit on an H100, not that they run correctly there.

    python tests/triton_aot.py            # every launch and config of the DeiT shapes, a table
    python tests/triton_aot.py --quick    # the subset tests/test_triton_compile.py runs

Run it with TRITON_INTERPRET unset: the interpreter's kernels are not compilable objects.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional
from unittest import mock

import torch
import triton

H100_SHARED_BYTES = 232448  # 227 KB per block (opt-in maximum on sm_90)
_TL_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
           torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1", torch.uint8: "*u8"}


@dataclasses.dataclass
class Launch:
    kernel: "triton.runtime.JITFunction"
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    options: Dict[str, int]
    tuned: bool  # one config of an autotuned launch (the autotuner skips configs that do not fit)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def label(self) -> str:
        keys = ("HEAD_DIM", "IN_DTYPE", "DOT_DTYPE", "BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_Q", "BLOCK_K", "BLOCK_C")
        parts = [f"{k}={self.constexprs[k]}" for k in keys if k in self.constexprs]
        if not any(k in self.constexprs for k in ("IN_DTYPE", "DOT_DTYPE")):
            parts.insert(0, next(t for t in self.signature.values() if t.startswith("*"))[1:])
        # The attention kernels' bias branches, where on (without a bias the label is the plain kernel's).
        c = self.constexprs
        flags = [name for key, name in (("HAS_BIAS", "+bias"), ("STORE_D_BIAS", "+d_bias")) if c.get(key)]
        if c.get("HAS_REL_POS"):
            tables = f"(d_tables G_PAD={c['GH_PAD']}x{c['GW_PAD']})" if c.get("REL_POS_GRAD") else ""
            flags.append("+rel_pos" + tables)
        return " ".join([self.name] + parts + flags + [f"w{self.options['num_warps']}s{self.options['num_stages']}"])


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return _TL_PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {value!r}")


class _Recorder:
    """Stands in for ``kernel[grid]`` (or an autotuner): records the launch instead of running it."""

    def __init__(self, kernel, sink: List[Launch], configs: Optional[list] = None):
        self.kernel, self.sink, self.configs = kernel, sink, configs

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **kwargs):
        options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
        signature, constexprs = {}, {}
        values = dict(zip(self.kernel.arg_names, args), **kwargs)
        for param in self.kernel.params:
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                if param.name in values:
                    constexprs[param.name] = values[param.name]
            else:
                signature[param.name] = _arg_type(values[param.name])
        for cfg in self.configs or [None]:
            if cfg is None:
                self.sink.append(Launch(self.kernel, signature, constexprs, dict(options), tuned=False))
                continue
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            self.sink.append(Launch(self.kernel, signature, dict(constexprs, **cfg.kwargs), opts, tuned=True))


@contextlib.contextmanager
def recording(sink: List[Launch]):
    """Every Triton launch of the package inside this block is recorded into ``sink`` with GPU settings."""
    from pm_kernels.kernels import attention_triton as at
    from pm_kernels.kernels import token_ops_triton as mt
    patches = [
        mock.patch.object(at, "_fwd_launch", _Recorder(at._attn_fwd_kernel, sink, at.FWD_CONFIGS)),
        mock.patch.object(at, "_dkdv_launch", _Recorder(at._attn_bwd_dkdv_kernel, sink, at.DKDV_CONFIGS)),
        mock.patch.object(at, "_dq_launch", _Recorder(at._attn_bwd_dq_kernel, sink, at.DQ_CONFIGS)),
        mock.patch.object(at, "_attn_bwd_preprocess", _Recorder(at._attn_bwd_preprocess, sink)),
        mock.patch.object(at, "_INTERPRET", False),
        mock.patch.object(at, "_BLOCK_KW", {}),
        mock.patch.object(mt, "interpreting", lambda: False),
        mock.patch.object(mt, "_num_sms", lambda device: 132),
    ] + [mock.patch.object(mt, name, _Recorder(getattr(mt, name), sink))
         for name in ("_shared_matmul_kernel", "_reconstruct_merge_fwd_kernel",
                      "_reconstruct_merge_bwd_kernel", "_batch_outer_sum_kernel")]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def attention_launches(B: int, H: int, N: int, D: int, dtype: torch.dtype, bias: bool = False,
                       rel_pos_grid: Optional[int] = None) -> List[Launch]:
    """Forward and backward (with the score) launches of the fused attention at this shape; with a general bias
    (and its gradient) and / or SAM's decomposed relative-position bias on a ``rel_pos_grid``-sided grid (and the
    tables' gradients)."""
    from pm_kernels.kernels import attention_triton as at
    sink: List[Launch] = []
    q, k, v, g = (torch.zeros(B, H, N, D, dtype=dtype) for _ in range(4))
    kwargs = {}
    if bias:
        kwargs["bias"] = torch.zeros(1, H, N, N, dtype=dtype)
    if rel_pos_grid is not None:
        kwargs.update(bias_h=torch.zeros(B, H, N, rel_pos_grid, dtype=dtype),
                      bias_w=torch.zeros(B, H, N, rel_pos_grid, dtype=dtype),
                      key_h=torch.zeros(N, dtype=torch.int64), key_w=torch.zeros(N, dtype=torch.int64))
    with recording(sink):
        out, lse = at.attention_fwd(q, k, v, D ** -0.5, **kwargs)
        at.attention_bwd(g, q, k, v, out, lse, D ** -0.5, torch.zeros(N), **kwargs, bias_grad=bias,
                         rel_pos_grad=rel_pos_grid is not None)
    return sink


# SAM's attention (ViT-B/L/H, head dim 64): windowed blocks, 14 × 14 windows (N = 196); global blocks, a 64 × 64 grid
# (N = 4096). The launches do not depend on N on a GPU (the autotuner picks among the same configs), but the tables'
# gradient tiles do on the grid side: 16 and 64 columns.
SAM_SHAPES = ((196, 14), (4096, 64))


def sam_launches(dtype: torch.dtype = torch.bfloat16) -> List[Launch]:
    """The attention launches of SAM's windowed and global blocks (B = 2 windows / images, H = 12), with the
    decomposed bias; and those of a general bias at the window's size."""
    launches = []
    for n, grid in SAM_SHAPES:
        launches += [launch for launch in attention_launches(2, 12, n, 64, dtype, rel_pos_grid=grid)
                     if launch.name != "_attn_bwd_preprocess"]  # no bias there: the plain kernel's launch
    return launches + [launch for launch in attention_launches(2, 12, 196, 64, dtype, bias=True)
                       if launch.name != "_attn_bwd_preprocess"]


def token_op_launches(B: int, N: int, K: int, K2: int, C: int, dtype: torch.dtype) -> List[Launch]:
    """Forward and backward launches of merge, reconstruct and the fused reconstruct_merge."""
    from pm_kernels.kernels import token_ops_triton as mt
    sink: List[Launch] = []
    keep = torch.zeros(N, dtype=torch.bool)
    keep[:K] = True

    def leaf(*shape, dt=dtype):
        return torch.zeros(*shape, dtype=dt, requires_grad=True)

    x, z, M, R, M2 = leaf(B, N, C), leaf(B, K, C), leaf(K, N, dt=torch.float32), \
        leaf(N, K, dt=torch.float32), leaf(K2, N, dt=torch.float32)
    with recording(sink):
        mt.merge(x, M).backward(torch.zeros(B, K, C, dtype=dtype))
        mt.reconstruct(z, R, x, keep).backward(torch.zeros(B, N, C, dtype=dtype))
        x2, z2 = mt.reconstruct_merge(z, R, x, keep, M2)
        torch.autograd.backward([x2, z2], [torch.zeros_like(x2), torch.zeros_like(z2)])
    return sink


def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary that ships inside triton's NVIDIA backend (ptxas, cuobjdump)."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_sm90(launch: Launch) -> Dict[str, int]:
    """Compile one launch for sm_90; returns shared memory bytes, registers and stack (spill) bytes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    src = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch.options)
    usage = {"shared": int(compiled.metadata.shared), "registers": -1, "stack": -1}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([nvidia_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)  # STACK > 0: registers spilled to local memory
    if m:
        usage["registers"], usage["stack"] = int(m.group(1)), int(m.group(2))
    return usage


def deit_launches() -> List[Launch]:
    """DeiT shapes: attention N = 197 at head dim 64 (DeiT-T/S/B) in fp32, fp16 and bf16, and at head dims 32
    and 128 in bf16; the token ops at DeiT-S (C = 384) with a keep-0.6-like boundary (K = 118, K' = 100), and in
    bf16 at N = 577 and 785 (384 px inputs), where the fused boundary's N-token tile is largest."""
    launches = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for D in ((32, 64, 128) if dtype == torch.bfloat16 else (64,)):
            launches += attention_launches(2, 2, 197, D, dtype)
        launches += token_op_launches(4, 197, 118, 100, 384, dtype)
    launches += token_op_launches(2, 577, 346, 300, 384, torch.bfloat16)
    launches += token_op_launches(2, 785, 471, 400, 768, torch.bfloat16)
    return launches + sam_launches(torch.bfloat16) + sam_launches(torch.float32)


def quick_launches() -> List[Launch]:
    """The CI subset: DeiT-S shapes in bf16 and fp32, the first config of each autotuned kernel, and the fused
    boundary at N = 785."""
    launches, firsts = [], set()
    for dtype in (torch.float32, torch.bfloat16):
        for launch in attention_launches(2, 2, 197, 64, dtype) + token_op_launches(4, 197, 118, 100, 384, dtype):
            key = (launch.name, dtype)
            if launch.tuned and key in firsts:
                continue
            firsts.add(key)
            launches.append(launch)
    # The fused boundary holds the whole N-token tile: its largest shared-memory case (DeiT-B at 384 px).
    launches += [launch for launch in token_op_launches(2, 785, 471, 400, 768, torch.bfloat16)
                 if launch.name.startswith("_reconstruct_merge")]
    # The bias branches in bf16 at SAM's shapes: the first config of each kernel, and for the dQ kernel (which holds
    # the tables' gradient tiles) at the global blocks' grid also its largest tile (128 × 64, 8 warps, 3 stages).
    firsts = set()
    for launch in sam_launches(torch.bfloat16):
        label = launch.label()
        key = (launch.name, "+rel_pos" in label, "+bias" in label, launch.constexprs.get("GH_PAD"))
        largest = (launch.name == "_attn_bwd_dq_kernel" and launch.constexprs.get("GH_PAD") == 64
                   and "BLOCK_M=128 BLOCK_N=64" in label and label.endswith("w8s3"))
        if key not in firsts or largest:
            firsts.add(key)
            launches.append(launch)
    return launches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="keep the launches whose label matches this regex")
    p.add_argument("--quick", action="store_true", help="the CI subset (quick_launches)")
    p.add_argument("--json", action="store_true", help="one JSON object per launch instead of the table")
    args = p.parse_args(argv)
    failed = 0
    seen = set()
    for launch in quick_launches() if args.quick else deit_launches():
        label = launch.label()
        key = (label, tuple(sorted(launch.signature.items())))
        if not re.search(args.only, label) or key in seen:
            continue
        seen.add(key)
        row = {"label": label, "kernel": launch.name, "tuned": launch.tuned}
        try:
            row.update(compile_sm90(launch))
            row["fits"] = row["shared"] <= H100_SHARED_BYTES
        except Exception as e:  # noqa: BLE001 - reported, counted
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if args.json:
            print(json.dumps(row), flush=True)
        elif "error" in row:
            print(f"FAIL {label}: {row['error']}", flush=True)
        else:
            print(f"{'ok  ' if row['fits'] else 'BIG '} {label}: shared {row['shared']} B, "
                  f"{row['registers']} regs, stack {row['stack']} B", flush=True)
        failed += "error" in row or not (row["fits"] or launch.tuned)
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    sys.exit(main())
