// pm_kernels native ops: schemas, CPU kernels, Meta (shape-only) kernels, the device-agnostic weight gradient
// (matrix_grad, one ATen GEMM) and the Python module. The CUDA kernels live in pm_ops_cuda.cu (DispatchKey::CUDA).
#include <Python.h>
#include <pybind11/pybind11.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "pm_ops.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace pm_kernels {
namespace {

// ---- CPU kernels --------------------------------------------------------------------------------

// out[b, i, c] = Σ_j W[i·si + j·sj] · y[b, j, c]  (+ (1 − m_i) · add[b, i, c]; m_i = keep[i], 0 if keep is null)
// W is in the accumulation type; y, add and out are contiguous (B, ·, C). The shortcut is a product, not a
// select, so a non-finite add on a kept row gives NaN there as the reference does (docs/architecture.md).
template <typename scalar_t, typename acc_t>
void apply_cpu(const acc_t* W, int64_t si, int64_t sj, int64_t I, int64_t J, const scalar_t* y, int64_t B,
               int64_t C, const scalar_t* add, const bool* keep, scalar_t* out) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, J * C));
  at::parallel_for(0, B * I, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(C));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / I, i = r % I;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < J; ++j) {
        const acc_t w = W[i * si + j * sj];
        const scalar_t* yr = y + (b * J + j) * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<acc_t>(yr[c]);
      }
      scalar_t* o = out + r * C;
      if (add != nullptr) {
        const acc_t pruned = (keep != nullptr && keep[i]) ? acc_t(0) : acc_t(1);
        const scalar_t* ar = add + r * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c] + pruned * static_cast<acc_t>(ar[c]));
      } else {
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

// out = W y (+ (1 − m) ⊙ add), or Wᵀ y when `transpose`; y (B, J, C) → out (B, I, C).
at::Tensor apply_dispatch_cpu(const at::Tensor& W_in, bool transpose, const at::Tensor& y_in,
                              const at::Tensor* add_in, const at::Tensor* keep_in) {
  ApplyPlan p = plan_apply(W_in, transpose, y_in, add_in, keep_in);
  if (p.out.numel() == 0) return p.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.y.scalar_type(), "pm_kernels_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    apply_cpu<scalar_t, acc_t>(p.W.data_ptr<acc_t>(), p.si, p.sj, p.I, p.J, p.y.data_ptr<scalar_t>(), p.B, p.C,
                               p.add.defined() ? p.add.data_ptr<scalar_t>() : nullptr,
                               p.keep.defined() ? p.keep.data_ptr<bool>() : nullptr, p.out.data_ptr<scalar_t>());
  });
  return p.out;
}

at::Tensor merge_fwd_cpu(const at::Tensor& x, const at::Tensor& M) {
  check_merge(x, M);
  return apply_dispatch_cpu(M, false, x, nullptr, nullptr);
}

at::Tensor reconstruct_fwd_cpu(const at::Tensor& z, const at::Tensor& R, const at::Tensor& x,
                               const at::Tensor& keep) {
  check_reconstruct(z, R, x, keep);
  return apply_dispatch_cpu(R, false, z, &x, &keep);
}

std::tuple<at::Tensor, at::Tensor> reconstruct_merge_fwd_cpu(const at::Tensor& z, const at::Tensor& R,
                                                             const at::Tensor& x, const at::Tensor& keep,
                                                             const at::Tensor& M_next) {
  check_reconstruct(z, R, x, keep);
  check_merge(x, M_next);
  at::Tensor x_next = apply_dispatch_cpu(R, false, z, &x, &keep);
  // z' is computed from x' as stored (in x's dtype), so it equals merge_fwd(x', M_next).
  at::Tensor z_next = apply_dispatch_cpu(M_next, false, x_next, nullptr, nullptr);
  return {x_next, z_next};
}

at::Tensor transposed_apply_cpu(const at::Tensor& W, const at::Tensor& g, const std::optional<at::Tensor>& addend) {
  check_transposed_apply(W, g, addend);
  const bool has_add = addend.has_value() && addend->defined();
  return apply_dispatch_cpu(W, true, g, has_add ? &*addend : nullptr, nullptr);
}

// ---- Meta kernels (shapes only; symbolic sizes so torch.compile can trace with dynamic shapes) ---

at::Tensor merge_fwd_meta(const at::Tensor& x, const at::Tensor& M) {
  TORCH_CHECK(x.dim() == 3 && M.dim() == 2, "pm_kernels: merge_fwd expects x (B, N, C) and M (K, N)");
  return at::empty_symint({x.sym_size(0), M.sym_size(0), x.sym_size(2)}, x.options());
}

at::Tensor reconstruct_fwd_meta(const at::Tensor& z, const at::Tensor& R, const at::Tensor& x,
                                const at::Tensor& keep) {
  TORCH_CHECK(x.dim() == 3 && z.dim() == 3 && R.dim() == 2 && keep.dim() == 1,
              "pm_kernels: reconstruct_fwd expects z (B, K, C), R (N, K), x (B, N, C), keep_mask (N,)");
  return at::empty_symint(x.sym_sizes(), x.options());
}

std::tuple<at::Tensor, at::Tensor> reconstruct_merge_fwd_meta(const at::Tensor& z, const at::Tensor& R,
                                                              const at::Tensor& x, const at::Tensor& keep,
                                                              const at::Tensor& M_next) {
  TORCH_CHECK(x.dim() == 3 && z.dim() == 3 && R.dim() == 2 && keep.dim() == 1 && M_next.dim() == 2,
              "pm_kernels: reconstruct_merge_fwd expects z (B, K, C), R (N, K), x (B, N, C), keep_mask (N,), "
              "M_next (K', N)");
  return {at::empty_symint(x.sym_sizes(), x.options()),
          at::empty_symint({x.sym_size(0), M_next.sym_size(0), x.sym_size(2)}, x.options())};
}

at::Tensor transposed_apply_meta(const at::Tensor& W, const at::Tensor& g, const std::optional<at::Tensor>& addend) {
  TORCH_CHECK(W.dim() == 2 && g.dim() == 3, "pm_kernels: transposed_apply expects W (I, J) and grad (B, I, C)");
  return at::empty_symint({g.sym_size(0), W.sym_size(1), g.sym_size(2)}, g.options());
}

at::Tensor matrix_grad_meta(const at::Tensor& g, const at::Tensor& y, at::ScalarType dtype) {
  TORCH_CHECK(g.dim() == 3 && y.dim() == 3, "pm_kernels: matrix_grad expects grad (B, I, C) and y (B, J, C)");
  return at::empty_symint({g.sym_size(1), y.sym_size(1)}, g.options().dtype(dtype));
}

}  // namespace

// out[i, j] = Σ_b Σ_c g[b, i, c] · y[b, j, c], i.e. one GEMM (I, B·C) × (B·C, J) in the accumulation dtype.
// The weight gradients dM, dR are a plain matrix product with a long contraction, which the vendor BLAS
// (MKL / cuBLAS) does far better than a hand loop; one copy per operand lays it out (I, B, C) and casts it.
at::Tensor matrix_grad_gemm(const at::Tensor& g, const at::Tensor& y, at::ScalarType dtype) {
  check_matrix_grad(g, y, dtype);
  const at::ScalarType acc = acc_dtype(g.scalar_type());
  const at::Tensor gt = g.transpose(0, 1).to(acc, false, false, at::MemoryFormat::Contiguous);
  const at::Tensor yt = y.transpose(0, 1).to(acc, false, false, at::MemoryFormat::Contiguous);
  return at::mm(gt.flatten(1), yt.flatten(1).t()).to(dtype);
}

TORCH_LIBRARY(pm_kernels, m) {
  m.def("merge_fwd(Tensor x, Tensor M) -> Tensor");
  m.def("reconstruct_fwd(Tensor z, Tensor R, Tensor x, Tensor keep_mask) -> Tensor");
  m.def("reconstruct_merge_fwd(Tensor z, Tensor R, Tensor x, Tensor keep_mask, Tensor M_next) -> (Tensor, Tensor)");
  m.def("transposed_apply(Tensor W, Tensor grad, Tensor? addend) -> Tensor");
  m.def("matrix_grad(Tensor grad, Tensor y, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(pm_kernels, CPU, m) {
  m.impl("merge_fwd", &merge_fwd_cpu);
  m.impl("reconstruct_fwd", &reconstruct_fwd_cpu);
  m.impl("reconstruct_merge_fwd", &reconstruct_merge_fwd_cpu);
  m.impl("transposed_apply", &transposed_apply_cpu);
}

// Device-agnostic (CPU and CUDA): built from ATen ops. Meta has its own shape-only kernel below.
TORCH_LIBRARY_IMPL(pm_kernels, CompositeExplicitAutograd, m) {
  m.impl("matrix_grad", &matrix_grad_gemm);
}

TORCH_LIBRARY_IMPL(pm_kernels, Meta, m) {
  m.impl("merge_fwd", &merge_fwd_meta);
  m.impl("reconstruct_fwd", &reconstruct_fwd_meta);
  m.impl("reconstruct_merge_fwd", &reconstruct_merge_fwd_meta);
  m.impl("transposed_apply", &transposed_apply_meta);
  m.impl("matrix_grad", &matrix_grad_meta);
}

}  // namespace pm_kernels

// `import pm_kernels._C` loads this library, which registers the ops above as torch.ops.pm_kernels.*.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "pm_kernels native ops (registered as torch.ops.pm_kernels.*)";
#ifdef PM_KERNELS_WITH_CUDA
  mod.attr("WITH_CUDA") = true;
#else
  mod.attr("WITH_CUDA") = false;
#endif
}
