// folded_cross_attention on CPU: CVPT's cross-attention with the frozen projections folded into
// per-head [H, M, d] weights. Rows are processed in blocks (at::parallel_for); a block's logits
// [rows, H*M] live in a thread-local tile: one GEMM x Wl^T (onto b_logits), the softmax of each
// head's M columns in place, one GEMM P Wv onto residual + bias. The backward recomputes P per
// block (nothing is saved in forward besides the inputs), forms dP = g Wv^T, the per-head softmax
// backward dS = P (dP - sum_head P dP) and dx = dS Wl (+ g when the residual is x itself); P and
// dS of all rows ([R, H*M], small) then give the weight gradients as single GEMMs / reductions
// over all rows (Wv: P^T g, Wl: dS^T x, b_logits: sum dS), deterministic, no atomics.
#include <ATen/Parallel.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <vector>

#include "../svpt.h"
#include "cpu_utils.h"

namespace svpt {
namespace cpu {
namespace {

// Rows per block at most: the GEMMs get 128 x d x H*M, large enough for BLAS, and the tile stays in L2.
constexpr int64_t kBlockRows = 128;

// Rows per block for R rows: kBlockRows, or fewer when that leaves threads idle (R = 136 on two
// threads: two blocks of 68, not 128 + 8); a multiple of 16, for the GEMMs.
int64_t block_rows(int64_t R) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t even = ((R + threads - 1) / threads + 15) / 16 * 16;
  return std::max<int64_t>(16, std::min(kBlockRows, even));
}

template <typename T>
struct Folded {
  const T* wl;  // [H*M, d]
  const T* bl;  // [H*M] or nullptr
  const T* wv;  // [H*M, d]
  int64_t d, H, M;
  int64_t hm() const { return H * M; }

  // s [n, H*M] <- per-head softmax of the logits of the n rows at x (row stride xs).
  void probabilities(const T* x, int64_t xs, int64_t n, T* s) const {
    const int64_t w = hm();
    if (bl) {
      for (int64_t r = 0; r < n; ++r) std::copy(bl, bl + w, s + r * w);
    }
    gemm(false, true, n, w, d, T(1), x, xs, wl, d, T(bl ? 1 : 0), s, w);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t h = 0; h < H; ++h) softmax_row(s + r * w + h * M, M);
  }
};

template <typename T>
Folded<T> folded(const at::Tensor& wl, const std::optional<at::Tensor>& bl, const at::Tensor& wv) {
  return {wl.data_ptr<T>(), bl ? bl->data_ptr<T>() : nullptr, wv.data_ptr<T>(), wl.size(2), wl.size(0), wl.size(1)};
}

// dst (row stride d) <- n rows of src (row stride ss).
template <typename T>
void copy_rows(const T* src, int64_t ss, int64_t n, int64_t d, T* dst) {
  for (int64_t r = 0; r < n; ++r) std::copy(src + r * ss, src + r * ss + d, dst + r * d);
}

// n rows of out (row stride d) <- residual + bias (either may be missing); returns the beta
// for the GEMM that adds the cross-attention onto them (0: nothing to add onto).
template <typename T>
T init_rows(T* out, int64_t n, int64_t d, const T* res, int64_t rs, const T* bias) {
  if (res) copy_rows(res, rs, n, d, out);
  if (bias) {
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < d; ++c) out[r * d + c] = (res ? out[r * d + c] : T(0)) + bias[c];
  }
  return T(res || bias ? 1 : 0);
}

template <typename T>
void forward(const Folded<T>& f, const T* x, int64_t xs, const T* res, int64_t rs, const T* bias, T* out,
             int64_t R) {
  const int64_t rows = block_rows(R), blocks = (R + rows - 1) / rows, w = f.hm(), d = f.d;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p(std::min(rows, R) * w);  // thread-local logits tile
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * rows, n = std::min(rows, R - r0);
      f.probabilities(x + r0 * xs, xs, n, p.data());
      const T beta = init_rows(out + r0 * d, n, d, res ? res + r0 * rs : nullptr, rs, bias);
      gemm(false, false, n, d, w, T(1), p.data(), w, f.wv, d, beta, out + r0 * d, d);
    }
  });
}

// Per block: p, ds ([R, H*M], rows of the block) and dx (row stride d).
template <typename T>
void backward_rows(const Folded<T>& f, const T* x, int64_t xs, const T* g, int64_t gs, bool add_x, T* p, T* ds,
                   T* dx, int64_t R) {
  const int64_t rows = block_rows(R), blocks = (R + rows - 1) / rows, w = f.hm(), d = f.d;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * rows, n = std::min(rows, R - r0);
      T* pb = p + r0 * w;
      T* dsb = ds + r0 * w;
      f.probabilities(x + r0 * xs, xs, n, pb);
      gemm(false, true, n, w, d, T(1), g + r0 * gs, gs, f.wv, d, T(0), dsb, w);  // dP = g Wv^T
      for (int64_t r = 0; r < n; ++r)
        for (int64_t h = 0; h < f.H; ++h) softmax_grad_row(pb + r * w + h * f.M, dsb + r * w + h * f.M, f.M);
      if (add_x) copy_rows(g + r0 * gs, gs, n, d, dx + r0 * d);  // the residual's gradient
      gemm(false, false, n, d, w, T(1), dsb, w, f.wl, d, T(add_x ? 1 : 0), dx + r0 * d, d);  // dx (+)= dS Wl
    }
  });
}

// Unit stride along d, as the GEMMs read rows.
at::Tensor rows_ready(const at::Tensor& t) { return t.stride(1) == 1 && t.stride(0) >= t.size(1) ? t : t.contiguous(); }

}  // namespace
}  // namespace cpu

at::Tensor folded_cross_attention_fwd_cpu(const at::Tensor& x_in, const at::Tensor& w_logits,
                                          const std::optional<at::Tensor>& b_logits, const at::Tensor& w_values,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& residual, bool add_x) {
  check_folded(x_in, w_logits, b_logits, w_values);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "svpt folded_cross_attention (CPU kernels): float32 or float64 expected, got ", x_in.scalar_type());
  const BelowAutograd below;  // gemm's ATen fallback (no MKL) included
  const at::Tensor x = cpu::rows_ready(x_in), wl = w_logits.contiguous(), wv = w_values.contiguous();
  const std::optional<at::Tensor> bl = b_logits ? std::optional<at::Tensor>(b_logits->contiguous()) : std::nullopt;
  const at::Tensor res = add_x ? x : (residual ? cpu::rows_ready(*residual) : at::Tensor());
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const int64_t R = x.size(0);
  at::Tensor out = at::empty({R, x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "svpt_folded_cross_attention_fwd_cpu", [&] {
    cpu::forward(cpu::folded<scalar_t>(wl, bl, wv), x.data_ptr<scalar_t>(), x.stride(0),
                 res.defined() ? res.data_ptr<scalar_t>() : nullptr, res.defined() ? res.stride(0) : 0,
                 b.defined() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), R);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> folded_cross_attention_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& w_logits,
    const std::optional<at::Tensor>& b_logits, const at::Tensor& w_values, bool bias_grad, bool add_x) {
  check_folded(x_in, w_logits, b_logits, w_values);
  const BelowAutograd below;  // the weight-gradient GEMMs below are ATen ops
  const at::Tensor x = cpu::rows_ready(x_in), g = cpu::rows_ready(grad.to(x.scalar_type()));
  const at::Tensor wl = w_logits.contiguous(), wv = w_values.contiguous();
  const std::optional<at::Tensor> bl = b_logits ? std::optional<at::Tensor>(b_logits->contiguous()) : std::nullopt;
  const int64_t R = x.size(0), H = wl.size(0), M = wl.size(1);
  at::Tensor p = at::empty({R, H * M}, x.options()), ds = at::empty({R, H * M}, x.options());
  at::Tensor dx = at::empty({R, x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "svpt_folded_cross_attention_bwd_cpu", [&] {
    cpu::backward_rows(cpu::folded<scalar_t>(wl, bl, wv), x.data_ptr<scalar_t>(), x.stride(0),
                       g.data_ptr<scalar_t>(), g.stride(0), add_x, p.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(),
                       dx.data_ptr<scalar_t>(), R);
  });
  at::Tensor dwl = at::mm(ds.t(), x).view(wl.sizes());
  at::Tensor dwv = at::mm(p.t(), g).view(wv.sizes());
  at::Tensor dbl = bl ? ds.sum(0).view({H, M}) : at::empty({0}, x.options());
  at::Tensor dbias = bias_grad ? g.sum(0) : at::empty({0}, x.options());
  return {dx, dwl, dbl, dwv, dbias};
}

}  // namespace svpt
