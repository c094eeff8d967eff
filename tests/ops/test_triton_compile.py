"""The Triton kernels compile for an H100 (sm_90) and fit its shared memory, checked without a GPU.

The interpreter tests prove the kernels' arithmetic; this proves the real compiler accepts them with the
block sizes the launchers pick on a GPU (``tests/triton_aot.py``, run in a subprocess because the
interpreter, on in this test session, replaces the kernels by Python objects that cannot be compiled).
"""
import json
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: triton_aot.py


def _compiler_available() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return False
    from triton_aot import nvidia_tool
    return os.path.exists(nvidia_tool("ptxas"))


@pytest.fixture(scope="module")
def quick_rows():
    if not _compiler_available():
        pytest.skip("this triton has no NVIDIA backend / ptxas to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(TESTS, "triton_aot.py"), "--quick", "--json"],
                          capture_output=True, text=True, env=env, cwd=os.path.dirname(TESTS), timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no launch compiled; stderr:\n{proc.stderr[-3000:]}"
    return rows


def test_every_kernel_is_covered(quick_rows):
    names = {r["kernel"] for r in quick_rows}
    assert names == {"_attn_fwd_kernel", "_attn_bwd_preprocess", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                     "_shared_matmul_kernel", "_batch_outer_sum_kernel", "_reconstruct_merge_fwd_kernel",
                     "_reconstruct_merge_bwd_kernel"}


def test_bias_branches_are_covered(quick_rows):
    """The attention kernels' bias branches at SAM's shapes (tests/triton_aot.py, sam_launches): the decomposed
    bias in the forward and dK/dV kernels, the dQ kernel with the window's (16) and the global grid's (64) table
    gradients, and the general bias with its gradient."""
    labels = [r["label"] for r in quick_rows]
    for kernel, branch in (("_attn_fwd_kernel", "+rel_pos "), ("_attn_bwd_dkdv_kernel", "+rel_pos "),
                           ("_attn_bwd_dq_kernel", "+rel_pos(d_tables G_PAD=16x16)"),
                           ("_attn_bwd_dq_kernel", "+rel_pos(d_tables G_PAD=64x64)"),
                           ("_attn_fwd_kernel", "+bias "), ("_attn_bwd_dkdv_kernel", "+bias "),
                           ("_attn_bwd_dq_kernel", "+bias +d_bias ")):
        assert any(label.startswith(kernel) and branch in label for label in labels), (kernel, branch)


def test_compiles_for_sm90(quick_rows):
    errors = [f"{r['label']}: {r['error']}" for r in quick_rows if "error" in r]
    assert not errors, "\n".join(errors)


def test_fits_h100_shared_memory(quick_rows):
    big = [f"{r['label']}: {r['shared']} B" for r in quick_rows if "error" not in r and not r["fits"]]
    assert not big, "\n".join(big)
    assert all(r["registers"] > 0 for r in quick_rows if "error" not in r), "cuobjdump gave no resource usage"
