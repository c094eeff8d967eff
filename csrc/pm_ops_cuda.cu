// pm_kernels CUDA kernels, registered under DispatchKey::CUDA for the ops defined in pm_ops.cpp.
// Only c10/cuda headers and the CUDA runtime are used (not ATen/cuda/CUDAContext.h, which needs the cuBLAS /
// cuSPARSE headers that a minimal CUDA toolkit lacks).
//
// Simple and bounds-checked by design (correctness first):
//  - apply_kernel: one thread per output element of out = W y (+ shortcut), fp32/fp64 accumulation.
//  - reconstruct_merge_kernel: the fused block boundary. One block per (channel tile, batch): it builds
//    the N × CT tile of x' = R z + (1 − m) ⊙ x in shared memory (and writes x' once), then computes the
//    K' × CT tile of z' = M' x' from shared memory, so x' is never re-read from global memory.
// The weight gradient matrix_grad (dM, dR) is one cuBLAS GEMM, registered for all devices in pm_ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

#include "pm_ops.h"

namespace pm_kernels {
namespace {

constexpr int kThreads = 256;

inline unsigned int grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 1 << 20)));
}

// out[b, i, c] = Σ_j W[i·si + j·sj] · y[b, j, c]  (+ (1 − m_i) · add[b, i, c]; m_i = keep[i], 0 if keep is null)
// The shortcut is a product, not a select: a non-finite add on a kept row gives NaN, as in the reference.
template <typename scalar_t, typename acc_t>
__global__ void apply_kernel(const acc_t* __restrict__ W, int64_t si, int64_t sj, int64_t I, int64_t J,
                             const scalar_t* __restrict__ y, int64_t B, int64_t C,
                             const scalar_t* __restrict__ add, const bool* __restrict__ keep,
                             scalar_t* __restrict__ out) {
  const int64_t total = B * I * C;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % C;
    const int64_t r = idx / C;  // b * I + i
    const int64_t i = r % I;
    const int64_t b = r / I;
    const scalar_t* yb = y + b * J * C + c;
    const acc_t* Wi = W + i * si;
    acc_t acc = 0;
    for (int64_t j = 0; j < J; ++j) acc += Wi[j * sj] * static_cast<acc_t>(yb[j * C]);
    if (add != nullptr) acc += ((keep != nullptr && keep[i]) ? acc_t(0) : acc_t(1)) * static_cast<acc_t>(add[idx]);
    out[idx] = static_cast<scalar_t>(acc);
  }
}

// Fused block boundary. grid = (ceil(C / CT), min(B, 65535)); blockDim.x = kThreads, a multiple of CT.
// Dynamic shared memory: N × CT values of acc_t (x' as stored, i.e. rounded to scalar_t).
template <typename scalar_t, typename acc_t>
__global__ void reconstruct_merge_kernel(const scalar_t* __restrict__ z, const acc_t* __restrict__ R,
                                         const scalar_t* __restrict__ x, const bool* __restrict__ keep,
                                         const acc_t* __restrict__ Mn, int64_t B, int64_t N, int64_t K,
                                         int64_t Kn, int64_t C, int CT, scalar_t* __restrict__ x_next,
                                         scalar_t* __restrict__ z_next) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);  // [N][CT]
  const int lane_c = threadIdx.x % CT;
  const int row0 = threadIdx.x / CT;
  const int rows_per = blockDim.x / CT;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * CT + lane_c;
  const bool valid = c < C;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    // Phase 1: x'[b, n, c] = Σ_k R[n, k] z[b, k, c] + (1 − m_n) x[b, n, c], kept in shared memory.
    for (int64_t n = row0; n < N; n += rows_per) {
      acc_t v = 0;
      if (valid) {
        const acc_t* Rn = R + n * K;
        const scalar_t* zb = z + b * K * C + c;
        acc_t acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += Rn[k] * static_cast<acc_t>(zb[k * C]);
        const int64_t o = (b * N + n) * C + c;
        acc += (keep[n] ? acc_t(0) : acc_t(1)) * static_cast<acc_t>(x[o]);  // (1 − m) ⊙ x: a product
        const scalar_t out = static_cast<scalar_t>(acc);
        x_next[o] = out;
        v = static_cast<acc_t>(out);
      }
      tile[n * CT + lane_c] = v;
    }
    __syncthreads();
    // Phase 2: z'[b, k, c] = Σ_n M'[k, n] x'[b, n, c], read from shared memory.
    if (valid) {
      for (int64_t k = row0; k < Kn; k += rows_per) {
        const acc_t* Mk = Mn + k * N;
        acc_t acc = 0;
        for (int64_t n = 0; n < N; ++n) acc += Mk[n] * tile[n * CT + lane_c];
        z_next[(b * Kn + k) * C + c] = static_cast<scalar_t>(acc);
      }
    }
    __syncthreads();  // the tile is rewritten for the next batch entry
  }
}

// ---- launchers ----------------------------------------------------------------------------------

// out = W y (+ (1 − m) ⊙ add), or Wᵀ y when `transpose`: y (B, J, C) → out (B, I, C).
at::Tensor apply_dispatch_cuda(const at::Tensor& W_in, bool transpose, const at::Tensor& y_in,
                               const at::Tensor* add_in, const at::Tensor* keep_in) {
  ApplyPlan p = plan_apply(W_in, transpose, y_in, add_in, keep_in);
  if (p.out.numel() == 0) return p.out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.y.scalar_type(), "pm_kernels_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    apply_kernel<scalar_t, acc_t><<<grid_for(p.out.numel(), kThreads), kThreads, 0, stream>>>(
        p.W.data_ptr<acc_t>(), p.si, p.sj, p.I, p.J, p.y.data_ptr<scalar_t>(), p.B, p.C,
        p.add.defined() ? p.add.data_ptr<scalar_t>() : nullptr,
        p.keep.defined() ? p.keep.data_ptr<bool>() : nullptr, p.out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p.out;
}

at::Tensor merge_fwd_cuda(const at::Tensor& x, const at::Tensor& M) {
  check_merge(x, M);
  const c10::cuda::CUDAGuard guard(x.device());
  return apply_dispatch_cuda(M, false, x, nullptr, nullptr);
}

at::Tensor reconstruct_fwd_cuda(const at::Tensor& z, const at::Tensor& R, const at::Tensor& x,
                                const at::Tensor& keep) {
  check_reconstruct(z, R, x, keep);
  const c10::cuda::CUDAGuard guard(x.device());
  return apply_dispatch_cuda(R, false, z, &x, &keep);
}

std::tuple<at::Tensor, at::Tensor> reconstruct_merge_fwd_cuda(const at::Tensor& z_in, const at::Tensor& R_in,
                                                              const at::Tensor& x_in, const at::Tensor& keep_in,
                                                              const at::Tensor& Mn_in) {
  check_reconstruct(z_in, R_in, x_in, keep_in);
  check_merge(x_in, Mn_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor z = z_in.contiguous(), x = x_in.contiguous(), keep = keep_in.contiguous();
  const at::ScalarType act = x.scalar_type();
  const at::Tensor R = acc_matrix(R_in, act), Mn = acc_matrix(Mn_in, act);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = z.size(1), Kn = Mn.size(0);
  at::Tensor x_next = at::empty_like(x);
  at::Tensor z_next = at::empty({B, Kn, C}, x.options());
  if (x_next.numel() == 0) {
    z_next.zero_();
    return {x_next, z_next};
  }
  // Channel tile: the widest of 32, 16, ..., 1 whose N × CT tile fits in the shared memory of a block.
  const int64_t acc_bytes = act == at::kDouble ? 8 : 4;
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device()));
  const int64_t smem_limit = std::max<int64_t>(smem_optin, 48 * 1024);
  int CT = 32;
  while (CT > 1 && N * CT * acc_bytes > smem_limit) CT /= 2;
  const int64_t smem = N * CT * acc_bytes;
  if (smem > smem_limit) {
    // Too many tokens for one tile even one channel wide: unfused (x' is re-read from global memory).
    at::Tensor xn = apply_dispatch_cuda(R, false, z, &x, &keep);
    return {xn, apply_dispatch_cuda(Mn, false, xn, nullptr, nullptr)};
  }
  const dim3 grid(static_cast<unsigned int>((C + CT - 1) / CT), static_cast<unsigned int>(std::min<int64_t>(B, 65535)));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act, "pm_kernels_reconstruct_merge_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = reconstruct_merge_kernel<scalar_t, acc_t>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<grid, kThreads, static_cast<size_t>(smem), stream>>>(
        z.data_ptr<scalar_t>(), R.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), keep.data_ptr<bool>(),
        Mn.data_ptr<acc_t>(), B, N, K, Kn, C, CT, x_next.data_ptr<scalar_t>(), z_next.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_next, z_next};
}

at::Tensor transposed_apply_cuda(const at::Tensor& W, const at::Tensor& g, const std::optional<at::Tensor>& addend) {
  check_transposed_apply(W, g, addend);
  const c10::cuda::CUDAGuard guard(g.device());
  const bool has_add = addend.has_value() && addend->defined();
  return apply_dispatch_cuda(W, true, g, has_add ? &*addend : nullptr, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(pm_kernels, CUDA, m) {
  m.impl("merge_fwd", &merge_fwd_cuda);
  m.impl("reconstruct_fwd", &reconstruct_fwd_cuda);
  m.impl("reconstruct_merge_fwd", &reconstruct_merge_fwd_cuda);
  m.impl("transposed_apply", &transposed_apply_cuda);
}

}  // namespace pm_kernels
