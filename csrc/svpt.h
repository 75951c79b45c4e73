// Declarations shared by the op registration (ops.cpp) and the CPU / CUDA kernels.
//
// Every op comes as a forward and a backward function; the autograd glue lives in
// svpt_kernels/cpp.py. Inputs reach these functions already promoted to one dtype
// (the Python wrapper follows the reference's type promotion); CPU kernels take
// float32 / float64, CUDA kernels also float16 / bfloat16 (accumulating in float32).
#pragma once

// Only the headers used (not ATen/ATen.h, which pulls in every op and doubles compile time).
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <tuple>

namespace svpt {

// One key/value segment of an attention ([1 or B, len, H, D] each): prompt_attention has one,
// prompt_kv_attention two (the prompt segment, then the tokens' own), read one after the other.
struct KV {
  at::Tensor k, v;
};

// ---- da_mix: CDC + DA gate and mix of the prompt rows of block l-1's output.
at::Tensor da_mix_fwd_cpu(const at::Tensor& tokens, const at::Tensor& prompts, const at::Tensor& weight,
                          const at::Tensor& bias, int64_t num_prefix);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> da_mix_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& tokens, const at::Tensor& prompts, const at::Tensor& weight,
    const at::Tensor& bias, int64_t num_prefix);

// ---- prompt_attention: softmax attention (+ AE saliency); returns out, lse [B, H, Tq]
// and the saliency (float32 [B, Tk - cols], or an empty tensor when sal_count == 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t sal_start,
    int64_t sal_count, int64_t sal_cols);
std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale);

// ---- prompt_kv_attention: attention of q over the keys/values [prompt_k; k], [prompt_v; v]
// without concatenating them; returns out and lse [B, H, Tq]. The backward returns the
// gradients of q, k, v, prompt_k, prompt_v (the prompt segment's summed over the batch when
// it has batch 1).
std::tuple<at::Tensor, at::Tensor> prompt_kv_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& prompt_k,
                                                               const at::Tensor& prompt_v, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prompt_kv_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prompt_k, const at::Tensor& prompt_v, const at::Tensor& out, const at::Tensor& lse,
    double scale);

// ---- folded_cross_attention: x [R, d] (unit last stride), w_logits / w_values [H, M, d],
// b_logits [H, M], bias [d], residual [R, d]; all of one dtype. Returns
// residual + sum_h softmax_M(x w_logits[h]^T + b_logits[h]) w_values[h] + bias, where
// add_x means the residual is x itself. The backward recomputes the probabilities and returns
// the gradients of x (including the residual's when add_x), w_logits, b_logits, w_values and
// bias (empty [0] tensors for a missing b_logits / bias).
at::Tensor folded_cross_attention_fwd_cpu(const at::Tensor& x, const at::Tensor& w_logits,
                                          const std::optional<at::Tensor>& b_logits, const at::Tensor& w_values,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& residual, bool add_x);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> folded_cross_attention_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w_logits,
    const std::optional<at::Tensor>& b_logits, const at::Tensor& w_values, bool has_bias, bool add_x);

// ---- ae_update: h = tokens + attn_out, then u = scale * mean(prompt rows of h) added to
// the top-k salient patch rows. Returns h, the absolute rows updated [B, k] (int64) and
// the prompt-row mean [B, d] (accumulation dtype), both kept for backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ae_update_fwd_cpu(
    const at::Tensor& tokens, const at::Tensor& attn_out, const at::Tensor& saliency, const at::Tensor& scale,
    int64_t num_prefix, int64_t num_prompts, int64_t k);
// Returns the gradient of h's inputs (tokens and attn_out share it) and of scale.
std::tuple<at::Tensor, at::Tensor> ae_update_bwd_cpu(const at::Tensor& grad, const at::Tensor& rows,
                                                     const at::Tensor& mean, const at::Tensor& scale,
                                                     int64_t num_prefix, int64_t num_prompts);

#ifdef SVPT_WITH_CUDA
at::Tensor da_mix_fwd_cuda(const at::Tensor& tokens, const at::Tensor& prompts, const at::Tensor& weight,
                           const at::Tensor& bias, int64_t num_prefix);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> da_mix_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& tokens, const at::Tensor& prompts, const at::Tensor& weight,
    const at::Tensor& bias, int64_t num_prefix);
std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t sal_start,
    int64_t sal_count, int64_t sal_cols);
std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale);
std::tuple<at::Tensor, at::Tensor> prompt_kv_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& prompt_k,
                                                                const at::Tensor& prompt_v, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prompt_kv_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prompt_k, const at::Tensor& prompt_v, const at::Tensor& out, const at::Tensor& lse,
    double scale);
at::Tensor folded_cross_attention_fwd_cuda(const at::Tensor& x, const at::Tensor& w_logits,
                                           const std::optional<at::Tensor>& b_logits, const at::Tensor& w_values,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& residual, bool add_x);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> folded_cross_attention_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w_logits,
    const std::optional<at::Tensor>& b_logits, const at::Tensor& w_values, bool has_bias, bool add_x);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ae_update_fwd_cuda(
    const at::Tensor& tokens, const at::Tensor& attn_out, const at::Tensor& saliency, const at::Tensor& scale,
    int64_t num_prefix, int64_t num_prompts, int64_t k);
std::tuple<at::Tensor, at::Tensor> ae_update_bwd_cuda(const at::Tensor& grad, const at::Tensor& rows,
                                                      const at::Tensor& mean, const at::Tensor& scale,
                                                      int64_t num_prefix, int64_t num_prompts);
#endif

// Shape checks shared by both device implementations (messages name the op and the shapes).
inline void check_da_mix(const at::Tensor& tokens, const at::Tensor& prompts, const at::Tensor& weight,
                         const at::Tensor& bias, int64_t num_prefix) {
  TORCH_CHECK(tokens.dim() == 3 && prompts.dim() == 3, "svpt da_mix: tokens [B, T, d] and prompts [B or 1, M, d] expected, got ",
              tokens.sizes(), " and ", prompts.sizes());
  const int64_t B = tokens.size(0), T = tokens.size(1), d = tokens.size(2), M = prompts.size(1);
  TORCH_CHECK(prompts.size(0) == B || prompts.size(0) == 1, "svpt da_mix: prompts batch must be ", B, " or 1, got ",
              prompts.size(0));
  TORCH_CHECK(prompts.size(2) == d, "svpt da_mix: prompts width ", prompts.size(2), " != tokens width ", d);
  TORCH_CHECK(num_prefix >= 0 && num_prefix + M <= T, "svpt da_mix: rows ", num_prefix, "..", num_prefix + M,
              " outside T=", T);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == 2 && weight.size(1) == d, "svpt da_mix: weight [2, ", d,
              "] expected, got ", weight.sizes());
  TORCH_CHECK(bias.numel() == 1, "svpt da_mix: bias must have one element, got ", bias.sizes());
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
  if (count == 0) return;
  TORCH_CHECK(start >= 0 && count > 0 && start + count <= q.size(1), "svpt prompt_attention: saliency rows (", start,
              ", ", count, ") outside Tq=", q.size(1));
  TORCH_CHECK(cols >= 0 && cols < k.size(1), "svpt prompt_attention: saliency_cols ", cols, " outside Tk=", k.size(1));
}

inline void check_ae_update(const at::Tensor& tokens, const at::Tensor& attn_out, const at::Tensor& saliency,
                            int64_t num_prefix, int64_t num_prompts, int64_t k) {
  TORCH_CHECK(tokens.dim() == 3 && tokens.sizes() == attn_out.sizes(), "svpt ae_update: tokens ", tokens.sizes(),
              " and attn_out ", attn_out.sizes(), " must both be [B, T, d]");
  const int64_t N = tokens.size(1) - num_prefix - num_prompts;
  TORCH_CHECK(num_prefix >= 0 && num_prompts > 0 && N > 0, "svpt ae_update: num_prefix ", num_prefix,
              ", num_prompts ", num_prompts, " leave no patch rows in T=", tokens.size(1));
  TORCH_CHECK(saliency.dim() == 2 && saliency.size(0) == tokens.size(0) && saliency.size(1) == N,
              "svpt ae_update: saliency [", tokens.size(0), ", ", N, "] expected, got ", saliency.sizes());
  TORCH_CHECK(k >= 1 && k <= N, "svpt ae_update: k=", k, " must be in 1..", N);
}

}  // namespace svpt
