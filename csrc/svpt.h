// Declarations shared by the op registration (ops.cpp) and the CPU / CUDA kernels.
//
// Every differentiable op comes as a forward and a backward function; the autograd glue lives in
// svpt_kernels/cpp.py. Inputs reach these functions already promoted to one dtype (the Python
// wrapper follows the reference's type promotion). da_mix and ae_update work in place on the
// rows they change, forward and backward (svpt/ops.py): their "(a!)" argument is written, only
// on those rows. CPU kernels take float32 / float64 (da_mix, ae_update and attention_saliency
// also float16 / bfloat16, computed in float32); CUDA kernels take all four, accumulating in
// float32 (float64 for float64).
#pragma once

// Only the headers used (not ATen/ATen.h, which pulls in every op and doubles compile time).
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <tuple>

namespace svpt {

// One key/value segment of an attention ([1 or B, len, H, D] each): prompt_attention has one,
// prompt_kv_attention two (the prompt segment, then the tokens' own), read one after the other.
struct KV {
  at::Tensor k, v;
};

// Held by every kernel entry point that calls ATen ops (sums, topk, casts): those run below
// autograd, so that what a kernel returns never carries autograd history (torch.library.opcheck's
// test_autograd_registration), and below autocast, since the inputs already are in the kernel's
// dtype.
struct BelowAutograd {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autograd_dispatch_keyset_with_ADInplaceOrView |
                                           c10::autocast_dispatch_keyset};
};

// The kernels of one device type (suffix cpu or cuda).
//
// da_mix_fwd: overwrites the M prompt rows num_prefix.. of tokens [B, T, d] with
//   g * P_out + (1 - g) * P (g = sigmoid(P_out . w0 + P . w1 + b)) and returns P_out [B, M, d]
//   (the rows' old values, kept for backward).
// da_mix_bwd: rewrites the prompt rows of grad (dL/dout -> dL/dtokens) in place and returns the
//   gradients of prompts ([1 or B, M, d], summed over the batch when it is 1), weight and bias.
// attention_saliency: float32 [B, Tk - col_start]: the softmax probabilities of the query rows
//   row_start .. row_start + row_count - 1 to the key columns col_start.., averaged over heads and
//   rows; no gradient.
// ae_update_fwd: adds u = scale * mean(h prompt rows) to the k patch rows of h [B, T, d] with the
//   highest saliency [B, N]; returns the prompt-row mean [B, d] (accumulation dtype) and the
//   top-k patch indices [B, k] (int64, counted from the first patch row).
// ae_update_bwd: adds the u path's gradient, scale / M * sum over the selected rows of grad, to
//   the prompt rows of grad in place; returns dL/dscale (shaped and typed as scale).
// prompt_attention: softmax(q k^T scale) v per head, q [B, Tq, H, D], k, v [1 or B, Tk, H, D];
//   returns out and lse [B, H, Tq] (accumulation dtype); the backward recomputes the
//   probabilities from lse and returns dq, dk, dv (dk, dv summed over the batch when it is 1).
// prompt_kv_attention: attention of q over [prompt_k; k], [prompt_v; v] without concatenating
//   them; the backward returns the gradients of q, k, v, prompt_k, prompt_v.
// folded_cross_attention: x [R, d] (unit last stride), w_logits / w_values [H, M, d], b_logits
//   [H, M], bias [d], residual [R, d]; returns residual + sum_h softmax_M(x w_logits[h]^T +
//   b_logits[h]) w_values[h] + bias (add_x: the residual is x itself). The backward recomputes the
//   probabilities and returns the gradients of x (with the residual's when add_x), w_logits,
//   b_logits, w_values and bias (empty [0] tensors for a missing b_logits / bias).
#define SVPT_DECLARE_KERNELS(dev)                                                                                     \
  at::Tensor da_mix_fwd_##dev(at::Tensor& tokens, const at::Tensor& prompts, const at::Tensor& weight,                 \
                              const at::Tensor& bias, int64_t num_prefix);                                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> da_mix_bwd_##dev(at::Tensor& grad, const at::Tensor& prev,            \
                                                                  const at::Tensor& prompts, const at::Tensor& weight, \
                                                                  const at::Tensor& bias, int64_t num_prefix);         \
  at::Tensor attention_saliency_##dev(const at::Tensor& q, const at::Tensor& k, double scale, int64_t row_start,       \
                                      int64_t row_count, int64_t col_start);                                           \
  std::tuple<at::Tensor, at::Tensor> ae_update_fwd_##dev(at::Tensor& h, const at::Tensor& saliency,                    \
                                                         const at::Tensor& scale, int64_t num_prefix,                  \
                                                         int64_t num_prompts, int64_t k);                              \
  at::Tensor ae_update_bwd_##dev(at::Tensor& grad, const at::Tensor& mean, const at::Tensor& index,                    \
                                 const at::Tensor& scale, int64_t num_prefix, int64_t num_prompts);                    \
  std::tuple<at::Tensor, at::Tensor> prompt_attention_fwd_##dev(const at::Tensor& q, const at::Tensor& k,              \
                                                                const at::Tensor& v, double scale);                    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_attention_bwd_##dev(                                           \
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                       \
      const at::Tensor& out, const at::Tensor& lse, double scale);                                                     \
  std::tuple<at::Tensor, at::Tensor> prompt_kv_attention_fwd_##dev(const at::Tensor& q, const at::Tensor& k,           \
                                                                   const at::Tensor& v, const at::Tensor& prompt_k,    \
                                                                   const at::Tensor& prompt_v, double scale);          \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prompt_kv_attention_bwd_##dev(                \
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                       \
      const at::Tensor& prompt_k, const at::Tensor& prompt_v, const at::Tensor& out, const at::Tensor& lse,            \
      double scale);                                                                                                   \
  at::Tensor folded_cross_attention_fwd_##dev(const at::Tensor& x, const at::Tensor& w_logits,                         \
                                              const std::optional<at::Tensor>& b_logits, const at::Tensor& w_values,   \
                                              const std::optional<at::Tensor>& bias,                                   \
                                              const std::optional<at::Tensor>& residual, bool add_x);                  \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> folded_cross_attention_bwd_##dev(             \
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w_logits,                                         \
      const std::optional<at::Tensor>& b_logits, const at::Tensor& w_values, bool bias_grad, bool add_x);

SVPT_DECLARE_KERNELS(cpu)
#ifdef SVPT_WITH_CUDA
SVPT_DECLARE_KERNELS(cuda)
#endif
#undef SVPT_DECLARE_KERNELS

// ---- Shape checks shared by both device implementations (messages name the op and the shapes).
// The Python entry (svpt.checks) has validated user input already; these guard the kernels'
// memory accesses against a direct call of torch.ops.svpt_cpp.*.

// The buffer an in-place op writes: [B, T, d] with unit stride along d (any outer strides).
inline void check_row_buffer(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 3, "svpt ", op, ": ", name, " must be [B, T, d], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) <= 1, "svpt ", op, ": ", name,
              " is written in place, so its last dimension must be contiguous; got strides ", t.strides());
}

inline void check_da_mix(const at::Tensor& tokens, const at::Tensor& prompts, const at::Tensor& weight,
                         const at::Tensor& bias, int64_t num_prefix) {
  check_row_buffer(tokens, "da_mix", "tokens");
  TORCH_CHECK(prompts.dim() == 3, "svpt da_mix: prompts [B or 1, M, d] expected, got ", prompts.sizes());
  const int64_t B = tokens.size(0), T = tokens.size(1), d = tokens.size(2), M = prompts.size(1);
  TORCH_CHECK(prompts.size(0) == B || prompts.size(0) == 1, "svpt da_mix: prompts batch must be ", B, " or 1, got ",
              prompts.size(0));
  TORCH_CHECK(prompts.size(2) == d, "svpt da_mix: prompts width ", prompts.size(2), " != tokens width ", d);
  TORCH_CHECK(prompts.scalar_type() == tokens.scalar_type(), "svpt da_mix: prompts (", prompts.scalar_type(),
              ") must have the tokens' dtype (", tokens.scalar_type(), ")");
  TORCH_CHECK(num_prefix >= 0 && num_prefix + M <= T, "svpt da_mix: rows ", num_prefix, "..", num_prefix + M,
              " outside T=", T);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == 2 && weight.size(1) == d, "svpt da_mix: weight [2, ", d,
              "] expected, got ", weight.sizes());
  TORCH_CHECK(bias.numel() == 1, "svpt da_mix: bias must have one element, got ", bias.sizes());
}

// prev [B, M, d] (the saved P_out) against the gradient buffer and the prompts.
inline void check_da_mix_bwd(const at::Tensor& grad, const at::Tensor& prev, const at::Tensor& prompts,
                             const at::Tensor& weight, const at::Tensor& bias, int64_t num_prefix) {
  check_da_mix(grad, prompts, weight, bias, num_prefix);
  TORCH_CHECK(prev.dim() == 3 && prev.size(0) == grad.size(0) && prev.size(1) == prompts.size(1) &&
                  prev.size(2) == grad.size(2) && prev.scalar_type() == grad.scalar_type(),
              "svpt da_mix backward: prev must be [B, M, d] of the gradient's dtype, got ", prev.sizes(), " ",
              prev.scalar_type());
}

inline void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "svpt prompt_attention: q, k, v must be [B, T, H, D], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "svpt prompt_attention: k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK(k.size(0) == q.size(0) || k.size(0) == 1, "svpt prompt_attention: k/v batch must be ", q.size(0),
              " or 1, got ", k.size(0));
  TORCH_CHECK(k.size(2) == q.size(2) && k.size(3) == q.size(3), "svpt prompt_attention: heads/head dim of q ",
              q.sizes(), " and k ", k.sizes(), " differ");
  TORCH_CHECK(k.size(1) > 0, "svpt prompt_attention: no keys");
}

inline void check_kv_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& prompt_k, const at::Tensor& prompt_v) {
  check_attention(q, k, v);
  check_attention(q, prompt_k, prompt_v);
  TORCH_CHECK(k.size(0) == q.size(0), "svpt prompt_kv_attention: k/v batch must be ", q.size(0), ", got ", k.size(0));
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  prompt_k.scalar_type() == q.scalar_type() && prompt_v.scalar_type() == q.scalar_type(),
              "svpt prompt_kv_attention: q, k, v, prompt_k, prompt_v must share one dtype");
}

inline void check_folded(const at::Tensor& x, const at::Tensor& w_logits, const std::optional<at::Tensor>& b_logits,
                         const at::Tensor& w_values) {
  TORCH_CHECK(x.dim() == 2 && w_logits.dim() == 3 && w_logits.size(2) == x.size(1),
              "svpt folded_cross_attention: x [R, d] and w_logits [H, M, d] expected, got ", x.sizes(), " and ",
              w_logits.sizes());
  TORCH_CHECK(w_values.sizes() == w_logits.sizes(), "svpt folded_cross_attention: w_values ", w_values.sizes(),
              " != w_logits ", w_logits.sizes());
  if (b_logits) {
    TORCH_CHECK(b_logits->numel() == w_logits.size(0) * w_logits.size(1),
                "svpt folded_cross_attention: b_logits must be [H, M], got ", b_logits->sizes());
  }
  for (const at::Tensor& t : {w_logits, w_values}) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "svpt folded_cross_attention: x and the folded weights must share "
                "one dtype, got ", x.scalar_type(), " and ", t.scalar_type());
  }
}

inline void check_saliency(const at::Tensor& q, const at::Tensor& k, int64_t start, int64_t count, int64_t cols) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && (k.size(0) == q.size(0) || k.size(0) == 1) &&
                  k.size(2) == q.size(2) && k.size(3) == q.size(3),
              "svpt attention_saliency: q [B, Tq, H, D] and k [B or 1, Tk, H, D] expected, got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "svpt attention_saliency: q and k must share one dtype");
  TORCH_CHECK(start >= 0 && count > 0 && start + count <= q.size(1), "svpt attention_saliency: rows (", start, ", ",
              count, ") outside Tq=", q.size(1));
  TORCH_CHECK(cols >= 0 && cols < k.size(1), "svpt attention_saliency: saliency_cols ", cols, " outside Tk=",
              k.size(1));
}

inline void check_ae_update(const at::Tensor& h, const at::Tensor& saliency, const at::Tensor& scale,
                            int64_t num_prefix, int64_t num_prompts, int64_t k) {
  check_row_buffer(h, "ae_update", "h");
  const int64_t N = h.size(1) - num_prefix - num_prompts;
  TORCH_CHECK(num_prefix >= 0 && num_prompts > 0 && N > 0, "svpt ae_update: num_prefix ", num_prefix,
              ", num_prompts ", num_prompts, " leave no patch rows in T=", h.size(1));
  TORCH_CHECK(saliency.dim() == 2 && saliency.size(0) == h.size(0) && saliency.size(1) == N,
              "svpt ae_update: saliency [", h.size(0), ", ", N, "] expected, got ", saliency.sizes());
  TORCH_CHECK(scale.numel() == 1, "svpt ae_update: scale must have one element, got ", scale.sizes());
  TORCH_CHECK(k >= 1 && k <= N, "svpt ae_update: k=", k, " must be in 1..", N);
}

// mean [B, d] and index [B, k] (from the forward) against the gradient buffer.
inline void check_ae_update_bwd(const at::Tensor& grad, const at::Tensor& mean, const at::Tensor& index,
                                const at::Tensor& scale, int64_t num_prefix, int64_t num_prompts) {
  check_row_buffer(grad, "ae_update backward", "grad");
  const int64_t B = grad.size(0), N = grad.size(1) - num_prefix - num_prompts;
  TORCH_CHECK(num_prefix >= 0 && num_prompts > 0 && N > 0, "svpt ae_update backward: no patch rows");
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) == B && mean.size(1) == grad.size(2) && mean.is_contiguous(),
              "svpt ae_update backward: mean must be a contiguous [B, d], got ", mean.sizes());
  TORCH_CHECK(index.dim() == 2 && index.size(0) == B && index.scalar_type() == at::kLong && index.is_contiguous(),
              "svpt ae_update backward: index must be a contiguous int64 [B, k], got ", index.sizes(), " ",
              index.scalar_type());
  TORCH_CHECK(scale.numel() == 1, "svpt ae_update backward: scale must have one element");
}

}  // namespace svpt
