"""Benchmarks of the token ops: on the GPU the block boundary in bf16, on the CPU every op of the extension.

GPU (skipped without CUDA): the block boundary x' = R z + (1 − m) ⊙ x, z' = M_next x' (SPEC §1), bf16 inference,
DeiT-S/16 at 224 sizes: B = 256, N = 197, C = 384, K = K_next = 118 (keep rate 0.6). Compared:
  - triton fused:    pm_kernels.kernels.token_ops_triton.reconstruct_merge (one kernel, x' tile kept on chip)
  - triton unfused:  token_ops_triton.reconstruct then token_ops_triton.merge (x' written, then re-read)
  - torch reference: pm_kernels.reference.reconstruct_merge_reference (separate matmuls + mul + add)

Run on a GPU:  pytest bench/test_bench_token_ops.py --benchmark-only
Each benchmark's extra_info records the bytes an op must move at least (read z, x; write x', z'; weights),
the bytes the unfused torch path moves (its temporaries included), and the achieved GB/s of the minimum.

CPU (``make bench``): merge, reconstruct and the fused reconstruct_merge, forward, fp32, DeiT-S widths at batch 8
(B = 8, N = 197, C = 384, K = 118): the compiled extension's C++ kernels (``backend="cuda"`` on CPU tensors)
against the torch reference (``backend="torch"``: BLAS matmuls), same inputs, one torch thread, one group per op,
so that ``--benchmark-compare`` shows the two side by side and against earlier runs.
"""
import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

B, N, C, K, K_NEXT = 256, 197, 384, 118, 118
DTYPE = torch.bfloat16
REPS = 10   # calls per timed round: amortises the synchronisation at the end of a round


def make_inputs(device, b=B, n=N, c=C, k=K, k_next=K_NEXT, dtype=DTYPE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(n, generator=g) > 0.1
    keep[0] = True
    x = torch.randn(b, n, c, generator=g).to(device, dtype)
    z = torch.randn(b, k, c, generator=g).to(device, dtype)
    R = (torch.randn(n, k, generator=g) / k ** 0.5).to(device)            # fp32 parameters (autocast-style)
    M_next = (torch.randn(k_next, n, generator=g) / n ** 0.5).to(device)
    return z, R, x, keep.to(device), M_next


def traffic_bytes(z, R, x, M_next):
    """Bytes each implementation moves through memory (activations at x's dtype, weights once)."""
    b, n, c = x.shape
    k, k_next = z.shape[1], M_next.shape[0]
    acts = b * c * x.element_size()       # one token row across the batch
    weights = R.numel() * R.element_size() + M_next.numel() * M_next.element_size()
    return {
        # read z, x; write x', z' — the minimum any implementation must move
        "triton_fused": acts * (k + n + n + k_next) + weights,
        # reconstruct: read z, x, write x'; merge: read x' again, write z'
        "triton_unfused": acts * (k + n + n + n + k_next) + weights,
        # R z → t1 (read K, write N); (1−m) ⊙ x → t2 (read N, write N); t1 + t2 → x' (read 2N, write N);
        # M x' → z' (read N, write K')
        "torch_reference": acts * ((k + n) + (n + n) + (3 * n) + (n + k_next)) + weights,
    }


def _ops():
    from pm_kernels import reference as ref
    from pm_kernels.kernels import token_ops_triton as mt

    def fused(z, R, x, keep, M_next):
        return mt.reconstruct_merge(z, R, x, keep, M_next)

    def unfused(z, R, x, keep, M_next):
        x_new = mt.reconstruct(z, R, x, keep)
        return x_new, mt.merge(x_new, M_next)

    def reference(z, R, x, keep, M_next):
        return ref.reconstruct_merge_reference(z, R, x, keep, M_next)

    return {"triton_fused": fused, "triton_unfused": unfused, "torch_reference": reference}


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@needs_cuda
@pytest.mark.parametrize("impl", ["triton_fused", "triton_unfused", "torch_reference"])
def test_bench_block_boundary_bf16(benchmark, impl):
    args = make_inputs("cuda")
    op = _ops()[impl]
    with torch.inference_mode():
        # Correctness first: every variant agrees with the float64 reference.
        z, R, x, keep, M_next = args
        want = _ops()["torch_reference"](z.double(), R.to(DTYPE).double(), x.double(), keep,
                                         M_next.to(DTYPE).double())
        got = op(*args)
        for g, w in zip(got, want):
            assert _rel_err(g, w) < 2e-2

        def run():
            for _ in range(REPS):
                op(*args)
            torch.cuda.synchronize()

        run()  # compile / warm up
        benchmark.pedantic(run, rounds=30, warmup_rounds=3, iterations=1)

    per_call_s = benchmark.stats.stats.median / REPS
    traffic = traffic_bytes(z, R, x, M_next)
    minimum, moved = traffic["triton_fused"], traffic[impl]
    benchmark.extra_info.update({
        "shape": f"B={B} N={N} C={C} K={K} K_next={K_NEXT}",
        "dtype": str(DTYPE).replace("torch.", ""),
        "device": torch.cuda.get_device_name(),
        "per_call_us": per_call_s * 1e6,
        "min_bytes": minimum,                      # what any implementation must move
        "est_bytes_moved": moved,                  # estimate for this implementation
        "achieved_GBps_of_min": minimum / per_call_s / 1e9,
        "achieved_GBps_est": moved / per_call_s / 1e9,
    })


# ------------------------------------------------------------------------------------------------------ CPU
CPU_B, CPU_ROUNDS = 8, 20


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # comparable across runs and machine loads (see test_bench_models.py)
    yield
    torch.set_num_threads(before)


def _extension_status():
    import pm_kernels
    status = pm_kernels.backends()["cuda"]
    return status.startswith("available"), status


@pytest.mark.parametrize("impl", ["extension_cpp", "torch_reference"])
@pytest.mark.parametrize("op", ["merge", "reconstruct", "reconstruct_merge"])
def test_bench_token_ops_cpu(benchmark, one_thread, op, impl):
    import pm_kernels
    if impl == "extension_cpp":
        ok, status = _extension_status()
        if not ok:
            pytest.skip(f"the compiled extension: {status}")
    z, R, x, keep, M_next = make_inputs("cpu", b=CPU_B, dtype=torch.float32)
    args = {"merge": (x, M_next), "reconstruct": (z, R, x, keep), "reconstruct_merge": (z, R, x, keep, M_next)}[op]
    fn = getattr(pm_kernels, op)
    backend = "cuda" if impl == "extension_cpp" else "torch"
    with torch.inference_mode():
        got, want = fn(*args, backend=backend), fn(*args, backend="torch")
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)  # correctness first

        def run():
            fn(*args, backend=backend)
        benchmark.group = f"token op {op}, CPU fp32, B={CPU_B} N={N} C={C} K={K}"
        benchmark.extra_info.update({"op": op, "backend": backend, "threads": torch.get_num_threads(),
                                     "shape": f"B={CPU_B} N={N} C={C} K={K} K_next={K_NEXT}"})
        benchmark.pedantic(run, rounds=CPU_ROUNDS, warmup_rounds=2, iterations=1)
