// pm_kernels native ops: shared declarations and input checks.
//
// Shapes (SPEC §1): x (B, N, C) all tokens, z (B, K, C) merged tokens, M (K, N), R (N, K),
// keep_mask bool (N,) with true = kept. M and R may be fp32 while x/z are fp16/bf16: every kernel
// accumulates in fp32 (fp64 for fp64 inputs) and writes the activation dtype; matrix gradients
// are written in the dtype asked for (the parameter's own dtype).
//
// Ops (schemas in pm_ops.cpp):
//   merge_fwd(x, M)                              -> z  = M x
//   reconstruct_fwd(z, R, x, keep_mask)          -> x' = R z + (1 - m) ⊙ x
//   reconstruct_merge_fwd(z, R, x, keep_mask, M') -> (x', M' x')
//   transposed_apply(W, g, addend?)              -> Wᵀ g (+ addend)        (dx of merge, dz of reconstruct)
//   matrix_grad(g, y, dtype)                     -> Σ_b g_b y_bᵀ           (dM, dR)
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace pm_kernels {

// ---- input checks, shared by the CPU, CUDA and Meta kernels ------------------------------------
inline void check_act(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "pm_kernels: ", name, " must be 3-D (B, tokens, C), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                   t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16),
              "pm_kernels: ", name, " must be float16/bfloat16/float32/float64, got ", t.scalar_type());
}

inline void check_mat(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2, "pm_kernels: ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "pm_kernels: ", name,
              " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, "pm_kernels: ", name, " must have shape (", rows,
              ", ", cols, "), got ", t.sizes());
}

inline void check_keep(const at::Tensor& keep, int64_t n) {
  TORCH_CHECK(keep.dim() == 1 && keep.size(0) == n, "pm_kernels: keep_mask must have shape (", n,
              ",), got ", keep.sizes());
  TORCH_CHECK(keep.scalar_type() == at::kBool, "pm_kernels: keep_mask must be bool, got ",
              keep.scalar_type());
}

inline void check_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "pm_kernels: ", name, " is on ", t.device(),
              " but the activations are on ", ref.device());
}

// merge: x (B, N, C), M (K, N)
inline void check_merge(const at::Tensor& x, const at::Tensor& M) {
  check_act(x, "x");
  TORCH_CHECK(M.dim() == 2, "pm_kernels: M must be 2-D (K, N), got ", M.sizes());
  check_mat(M, "M", M.size(0), x.size(1));
  check_device(x, M, "M");
}

// reconstruct: z (B, K, C), R (N, K), x (B, N, C), keep_mask (N,)
inline void check_reconstruct(const at::Tensor& z, const at::Tensor& R, const at::Tensor& x,
                              const at::Tensor& keep) {
  check_act(x, "x");
  check_act(z, "z");
  TORCH_CHECK(z.scalar_type() == x.scalar_type(), "pm_kernels: z and x must share a dtype, got ",
              z.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK(z.size(0) == x.size(0) && z.size(2) == x.size(2), "pm_kernels: z ", z.sizes(),
              " and x ", x.sizes(), " must agree on batch and channels");
  check_mat(R, "R", x.size(1), z.size(1));
  check_keep(keep, x.size(1));
  check_device(x, z, "z");
  check_device(x, R, "R");
  check_device(x, keep, "keep_mask");
}

// transposed_apply: W (I, J), g (B, I, C), addend (B, J, C) or undefined
inline void check_transposed_apply(const at::Tensor& W, const at::Tensor& g,
                                   const std::optional<at::Tensor>& addend) {
  check_act(g, "grad");
  TORCH_CHECK(W.dim() == 2, "pm_kernels: W must be 2-D, got ", W.sizes());
  check_mat(W, "W", g.size(1), W.size(1));
  check_device(g, W, "W");
  if (addend.has_value() && addend->defined()) {
    const at::Tensor& a = *addend;
    TORCH_CHECK(a.dim() == 3 && a.size(0) == g.size(0) && a.size(1) == W.size(1) && a.size(2) == g.size(2),
                "pm_kernels: addend must have shape (", g.size(0), ", ", W.size(1), ", ", g.size(2), "), got ",
                a.sizes());
    TORCH_CHECK(a.scalar_type() == g.scalar_type(), "pm_kernels: addend and grad must share a dtype");
    check_device(g, a, "addend");
  }
}

// matrix_grad: g (B, I, C), y (B, J, C)
inline void check_matrix_grad(const at::Tensor& g, const at::Tensor& y, at::ScalarType dtype) {
  check_act(g, "grad");
  check_act(y, "y");
  TORCH_CHECK(g.size(0) == y.size(0) && g.size(2) == y.size(2), "pm_kernels: grad ", g.sizes(), " and y ",
              y.sizes(), " must agree on batch and channels");
  TORCH_CHECK(g.scalar_type() == y.scalar_type(), "pm_kernels: grad and y must share a dtype");
  TORCH_CHECK(at::isFloatingType(dtype), "pm_kernels: matrix_grad dtype must be floating, got ", dtype);
  check_device(g, y, "y");
}

// The dtype a kernel accumulates in (and holds M/R in) for activations of dtype `t`.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The matrix operand in the accumulation dtype, contiguous.
inline at::Tensor acc_matrix(const at::Tensor& W, at::ScalarType act) { return W.to(acc_dtype(act)).contiguous(); }

// Operands and sizes of out = W y (+ (1 − m) ⊙ add), or Wᵀ y when `transpose`: y (B, J, C) → out (B, I, C).
// W is read through strides (si, sj), so Wᵀ costs no copy. Shared by the CPU and CUDA launchers.
struct ApplyPlan {
  at::Tensor y, W, add, keep, out;
  int64_t I, J, si, sj, B, C;
};

inline ApplyPlan plan_apply(const at::Tensor& W_in, bool transpose, const at::Tensor& y_in,
                            const at::Tensor* add_in, const at::Tensor* keep_in) {
  ApplyPlan p;
  p.y = y_in.contiguous();
  p.W = acc_matrix(W_in, p.y.scalar_type());
  p.I = transpose ? p.W.size(1) : p.W.size(0);
  p.J = transpose ? p.W.size(0) : p.W.size(1);
  p.si = transpose ? 1 : p.W.size(1);
  p.sj = transpose ? p.W.size(1) : 1;
  p.B = p.y.size(0);
  p.C = p.y.size(2);
  TORCH_CHECK(p.y.size(1) == p.J, "pm_kernels: internal shape mismatch");
  p.out = at::empty({p.B, p.I, p.C}, p.y.options());
  if (add_in != nullptr) p.add = add_in->contiguous();
  if (keep_in != nullptr) p.keep = keep_in->contiguous();
  return p;
}


}  // namespace pm_kernels
