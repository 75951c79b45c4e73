// prompt_attention on CPU: softmax attention computed per (batch, head) in blocks of query
// rows. The scores of one block live in a thread-local scratch tile (BQ x Tk), so nothing
// T x T is kept for backward: backward recomputes the probabilities from q, k and the
// saved log-sum-exp. Matrix products go to the BLAS torch links (gemm on raw strided
// pointers, no copies of q/k/v); the row-wise softmax loops are vectorised.
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "../svpt.h"
#include "cpu_utils.h"

namespace svpt {
namespace cpu {

// Query rows per scratch tile: a whole ViT sequence (T <= 256) in one tile makes the GEMMs
// large enough for BLAS to be efficient; 256 x Tk floats still fit in L2 for T ~ 250.
constexpr int64_t kBlockQ = 256;

// In place: s <- softmax(s); returns log-sum-exp.
// `omp simd` (we build with -fopenmp) lets the compiler reorder the float reductions.
SVPT_MULTIVERSION float softmax_row_f32(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  const float sum = exp_shifted_inplace(s, n, m);
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  return m + std::log(sum);
}
double softmax_row_f64(double* s, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  double sum = 0.;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  const double inv = 1. / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  return m + std::log(sum);
}

// In place: s <- p = exp(s - lse); dp <- ds = p * (dp - sum_j p_j dp_j).
// The row term sum_j p_j dp_j equals dO . O, but taken from the same p and dp (as eager's
// softmax backward does) it cancels exactly where it should, e.g. a single key gives ds = 0.
SVPT_MULTIVERSION void dsoftmax_row_f32(float* s, float* dp, int64_t n, float lse) {
  exp_shifted_inplace(s, n, lse);
  float di = 0.f;
#pragma omp simd reduction(+ : di)
  for (int64_t j = 0; j < n; ++j) di += s[j] * dp[j];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = s[j] * (dp[j] - di);
}
void dsoftmax_row_f64(double* s, double* dp, int64_t n, double lse) {
  double di = 0.;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - lse);
    di += s[j] * dp[j];
  }
  for (int64_t j = 0; j < n; ++j) dp[j] = s[j] * (dp[j] - di);
}

inline float softmax_row(float* s, int64_t n) { return softmax_row_f32(s, n); }
inline double softmax_row(double* s, int64_t n) { return softmax_row_f64(s, n); }
inline void dsoftmax_row(float* s, float* dp, int64_t n, float lse) { dsoftmax_row_f32(s, dp, n, lse); }
inline void dsoftmax_row(double* s, double* dp, int64_t n, double lse) { dsoftmax_row_f64(s, dp, n, lse); }

// BLAS wants unit stride along D and a row stride of at least D; anything else is copied.
at::Tensor gemm_ready(const at::Tensor& t) {
  if (t.stride(3) == 1 && t.stride(1) >= t.size(3) && t.stride(1) > 0) return t;
  return t.contiguous();
}

template <typename T>
static void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, T scale, at::Tensor& out,
                          at::Tensor& lse, at::Tensor& sal_part, int64_t sal_start, int64_t sal_count,
                          int64_t sal_cols) {
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3), Tk = k.size(1);
  const bool kv_bcast = k.size(0) == 1 && B > 1;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  T* sp = sal_count > 0 ? sal_part.data_ptr<T>() : nullptr;
  const int64_t qsb = q.stride(0), qst = q.stride(1), qsh = q.stride(2);
  const int64_t ksb = kv_bcast ? 0 : k.stride(0), kst = k.stride(1), ksh = k.stride(2);
  const int64_t vsb = kv_bcast ? 0 : v.stride(0), vst = v.stride(1), vsh = v.stride(2);
  const int64_t ost = H * D, Ns = Tk - sal_cols;

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(std::min(kBlockQ, Tq) * Tk);  // thread-local tile
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* kb = kp + b * ksb + h * ksh;
      const T* vb = vp + b * vsb + h * vsh;
      T* sal = sp ? sp + bh * Ns : nullptr;
      if (sal) std::fill(sal, sal + Ns, T(0));
      for (int64_t i0 = 0; i0 < Tq; i0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, Tq - i0);
        const T* qb = qp + b * qsb + i0 * qst + h * qsh;
        gemm(false, true, nq, Tk, D, scale, qb, qst, kb, kst, T(0), scores.data(), Tk);
        for (int64_t i = 0; i < nq; ++i) {
          T* s = scores.data() + i * Tk;
          lp[bh * Tq + i0 + i] = softmax_row(s, Tk);
          const int64_t row = i0 + i;
          if (sal && row >= sal_start && row < sal_start + sal_count) {
            for (int64_t j = 0; j < Ns; ++j) sal[j] += s[sal_cols + j];
          }
        }
        gemm(false, false, nq, D, Tk, T(1), scores.data(), Tk, vb, vst, T(0), op + (b * Tq + i0) * ost + h * D, ost);
      }
    }
  });
}

}  // namespace cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                        const at::Tensor& v_in, double scale,
                                                                        int64_t sal_start, int64_t sal_count,
                                                                        int64_t sal_cols) {
  check_attention(q_in, k_in, v_in);
  check_saliency(q_in, k_in, sal_start, sal_count, sal_cols);
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kDouble,
              "svpt prompt_attention (CPU kernels): float32 or float64 expected, got ", q_in.scalar_type());
  const at::Tensor q = cpu::gemm_ready(q_in), k = cpu::gemm_ready(k_in), v = cpu::gemm_ready(v_in);
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3), Tk = k.size(1);
  at::Tensor out = at::empty({B, Tq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options());
  at::Tensor sal_part = sal_count > 0 ? at::empty({B, H, Tk - sal_cols}, q.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "svpt_prompt_attention_fwd_cpu", [&] {
    cpu::attention_fwd<scalar_t>(q, k, v, static_cast<scalar_t>(scale), out, lse, sal_part, sal_start, sal_count,
                            sal_cols);
  });
  at::Tensor saliency = sal_count > 0 ? (sal_part.sum(1) / double(H * sal_count)).to(at::kFloat)
                                      : at::empty({0}, q.options().dtype(at::kFloat));
  return {out, lse, saliency};
}

namespace cpu {

template <typename T>
static void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, T scale, at::Tensor& dq, at::Tensor& dk,
                          at::Tensor& dv) {
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3), Tk = k.size(1);
  const bool kv_bcast = k.size(0) == 1 && B > 1;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* gp = dout.data_ptr<T>();
  const T* lp = lse.data_ptr<T>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();  // [B or 1 -> B when broadcast (partials), Tk, H, D], contiguous
  T* dvp = dv.data_ptr<T>();
  const int64_t qsb = q.stride(0), qst = q.stride(1), qsh = q.stride(2);
  const int64_t ksb = kv_bcast ? 0 : k.stride(0), kst = k.stride(1), ksh = k.stride(2);
  const int64_t vsb = kv_bcast ? 0 : v.stride(0), vst = v.stride(1), vsh = v.stride(2);
  const int64_t gsb = dout.stride(0), gst = dout.stride(1), gsh = dout.stride(2);
  const int64_t ost = H * D;  // out, dq, dk, dv are contiguous [., T, H, D]

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t bq = std::min(kBlockQ, Tq);
    std::vector<T> p(bq * Tk), ds(bq * Tk);  // thread-local tiles
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* kb = kp + b * ksb + h * ksh;
      const T* vb = vp + b * vsb + h * vsh;
      T* dkb = dkp + b * Tk * ost + h * D;
      T* dvb = dvp + b * Tk * ost + h * D;
      for (int64_t i0 = 0; i0 < Tq; i0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, Tq - i0);
        const T* qb = qp + b * qsb + i0 * qst + h * qsh;
        const T* gb = gp + b * gsb + i0 * gst + h * gsh;
        gemm(false, true, nq, Tk, D, scale, qb, qst, kb, kst, T(0), p.data(), Tk);   // S
        gemm(false, true, nq, Tk, D, T(1), gb, gst, vb, vst, T(0), ds.data(), Tk);   // dP = dO V^T
        for (int64_t i = 0; i < nq; ++i) dsoftmax_row(p.data() + i * Tk, ds.data() + i * Tk, Tk, lp[bh * Tq + i0 + i]);
        const T beta = i0 == 0 ? T(0) : T(1);  // first block initialises dK, dV
        gemm(true, false, Tk, D, nq, T(1), p.data(), Tk, gb, gst, beta, dvb, ost);    // dV += P^T dO
        gemm(true, false, Tk, D, nq, scale, ds.data(), Tk, qb, qst, beta, dkb, ost);  // dK += s dS^T Q
        gemm(false, false, nq, D, Tk, scale, ds.data(), Tk, kb, kst, T(0), dqp + (b * Tq + i0) * ost + h * D,
             ost);  // dQ = s dS K
      }
    }
  });
}

}  // namespace cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_attention_bwd_cpu(const at::Tensor& grad_out,
                                                                        const at::Tensor& q_in, const at::Tensor& k_in,
                                                                        const at::Tensor& v_in, const at::Tensor& out,
                                                                        const at::Tensor& lse, double scale) {
  check_attention(q_in, k_in, v_in);
  const at::Tensor q = cpu::gemm_ready(q_in), k = cpu::gemm_ready(k_in), v = cpu::gemm_ready(v_in);
  const at::Tensor g = cpu::gemm_ready(grad_out.to(q.scalar_type()));
  const at::Tensor o = out.contiguous(), l = lse.contiguous();
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3), Tk = k.size(1);
  const bool kv_bcast = k.size(0) == 1 && B > 1;
  at::Tensor dq = at::empty({B, Tq, H, D}, q.options());
  // Broadcast k/v: per-sample partial gradients, summed afterwards (deterministic).
  at::Tensor dk = at::empty({B, Tk, H, D}, q.options());
  at::Tensor dv = at::empty({B, Tk, H, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "svpt_prompt_attention_bwd_cpu", [&] {
    cpu::attention_bwd<scalar_t>(g, q, k, v, o, l, static_cast<scalar_t>(scale), dq, dk, dv);
  });
  if (kv_bcast) {
    dk = dk.sum(0, true);
    dv = dv.sum(0, true);
  }
  return {dq, dk, dv};
}

}  // namespace svpt
