// prompt_attention and prompt_kv_attention on CPU: softmax attention computed per (batch, head)
// in blocks of query rows. The keys/values come as one segment (prompt_attention) or two read
// one after the other (prompt_kv_attention: the prompt segment, then the tokens' own), never
// concatenated: each segment's GEMMs write their columns of the same scores tile. The scores of
// one block live in a thread-local scratch tile (BQ x Tk), so nothing T x T is kept for
// backward: backward recomputes the probabilities from q, k and the saved log-sum-exp. Matrix
// products go to the BLAS torch links (gemm on raw strided pointers, no copies of q/k/v); the
// row-wise softmax loops are vectorised.
#include <ATen/Parallel.h>

#include <vector>

#include "../svpt.h"
#include "cpu_utils.h"

namespace svpt {
namespace cpu {

// Query rows per scratch tile: a whole ViT sequence (T <= 256) in one tile makes the GEMMs
// large enough for BLAS to be efficient; 256 x Tk floats still fit in L2 for T ~ 250.
constexpr int64_t kBlockQ = 256;

// The keys and values of one segment ([1 or B, len, H, D], gemm_ready) and, in backward,
// where its gradients go: [B, len, H, D] contiguous (per-sample partials when batch 1).
template <typename T>
struct Segment {
  const T* k;
  const T* v;
  int64_t ksb, kst, ksh, vsb, vst, vsh, len;  // element strides; batch stride 0 when shared
  T* dk = nullptr;
  T* dv = nullptr;

  Segment(const KV& kv)  // NOLINT: implicit, so that segments() converts a list of KV
      : k(kv.k.data_ptr<T>()),
        v(kv.v.data_ptr<T>()),
        ksb(kv.k.size(0) == 1 ? 0 : kv.k.stride(0)),
        kst(kv.k.stride(1)),
        ksh(kv.k.stride(2)),
        vsb(kv.v.size(0) == 1 ? 0 : kv.v.stride(0)),
        vst(kv.v.stride(1)),
        vsh(kv.v.stride(2)),
        len(kv.k.size(1)) {}
  const T* k_at(int64_t b, int64_t h) const { return k + b * ksb + h * ksh; }
  const T* v_at(int64_t b, int64_t h) const { return v + b * vsb + h * vsh; }
};

template <typename T>
std::vector<Segment<T>> segments(const std::vector<KV>& kv) {
  return std::vector<Segment<T>>(kv.begin(), kv.end());
}

int64_t total_keys(const std::vector<KV>& kv) {
  int64_t n = 0;
  for (const KV& s : kv) n += s.k.size(1);
  return n;
}

template <typename T>
static void attention_fwd(const at::Tensor& q, const std::vector<Segment<T>>& segs, int64_t Tk, T scale,
                          at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  const int64_t qsb = q.stride(0), qst = q.stride(1), qsh = q.stride(2);
  const int64_t ost = H * D;

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(std::min(kBlockQ, Tq) * Tk);  // thread-local tile
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t i0 = 0; i0 < Tq; i0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, Tq - i0);
        const T* qb = qp + b * qsb + i0 * qst + h * qsh;
        int64_t c0 = 0;
        for (const Segment<T>& s : segs) {  // S[:, segment columns] = scale Q K_s^T
          gemm(false, true, nq, s.len, D, scale, qb, qst, s.k_at(b, h), s.kst, T(0), scores.data() + c0, Tk);
          c0 += s.len;
        }
        for (int64_t i = 0; i < nq; ++i) lp[bh * Tq + i0 + i] = softmax_row(scores.data() + i * Tk, Tk);
        T* ob = op + (b * Tq + i0) * ost + h * D;
        c0 = 0;
        for (const Segment<T>& s : segs) {  // O = sum over segments of P_s V_s
          gemm(false, false, nq, D, s.len, T(1), scores.data() + c0, Tk, s.v_at(b, h), s.vst, T(c0 ? 1 : 0), ob,
               ost);
          c0 += s.len;
        }
      }
    }
  });
}

template <typename T>
static void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const std::vector<Segment<T>>& segs,
                          int64_t Tk, const at::Tensor& lse, T scale, at::Tensor& dq) {
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const T* qp = q.data_ptr<T>();
  const T* gp = dout.data_ptr<T>();
  const T* lp = lse.data_ptr<T>();
  T* dqp = dq.data_ptr<T>();
  const int64_t qsb = q.stride(0), qst = q.stride(1), qsh = q.stride(2);
  const int64_t gsb = dout.stride(0), gst = dout.stride(1), gsh = dout.stride(2);
  const int64_t ost = H * D;  // dq and the segments' dk, dv are contiguous [., T, H, D]

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t bq = std::min(kBlockQ, Tq);
    std::vector<T> p(bq * Tk), ds(bq * Tk);  // thread-local tiles
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t i0 = 0; i0 < Tq; i0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, Tq - i0);
        const T* qb = qp + b * qsb + i0 * qst + h * qsh;
        const T* gb = gp + b * gsb + i0 * gst + h * gsh;
        int64_t c0 = 0;
        for (const Segment<T>& s : segs) {
          gemm(false, true, nq, s.len, D, scale, qb, qst, s.k_at(b, h), s.kst, T(0), p.data() + c0, Tk);  // S
          gemm(false, true, nq, s.len, D, T(1), gb, gst, s.v_at(b, h), s.vst, T(0), ds.data() + c0, Tk);  // dP
          c0 += s.len;
        }
        for (int64_t i = 0; i < nq; ++i) dsoftmax_row(p.data() + i * Tk, ds.data() + i * Tk, Tk, lp[bh * Tq + i0 + i]);
        const T beta = i0 == 0 ? T(0) : T(1);  // first block initialises dK, dV
        T* dqb = dqp + (b * Tq + i0) * ost + h * D;
        c0 = 0;
        for (const Segment<T>& s : segs) {
          const int64_t at = b * s.len * ost + h * D;
          gemm(true, false, s.len, D, nq, T(1), p.data() + c0, Tk, gb, gst, beta, s.dv + at, ost);     // dV += P^T dO
          gemm(true, false, s.len, D, nq, scale, ds.data() + c0, Tk, qb, qst, beta, s.dk + at, ost);  // dK += s dS^T Q
          gemm(false, false, nq, D, s.len, scale, ds.data() + c0, Tk, s.k_at(b, h), s.kst, T(c0 ? 1 : 0), dqb,
               ost);  // dQ = s sum over segments of dS_s K_s
          c0 += s.len;
        }
      }
    }
  });
}

}  // namespace cpu

namespace {

void check_cpu_dtype(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "svpt ", op,
              " (CPU kernels): float32 or float64 expected, got ", q.scalar_type());
}

std::vector<KV> gemm_ready(const std::vector<KV>& kv) {
  std::vector<KV> out;
  for (const KV& s : kv) out.push_back({cpu::gemm_ready(s.k), cpu::gemm_ready(s.v)});
  return out;
}

// out [B, Tq, H, D] and lse [B, H, Tq].
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q_in, const std::vector<KV>& kv_in,
                                                     double scale) {
  const at::Tensor q = cpu::gemm_ready(q_in);
  const std::vector<KV> kv = gemm_ready(kv_in);
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3), Tk = cpu::total_keys(kv);
  at::Tensor out = at::empty({B, Tq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "svpt_attention_fwd_cpu", [&] {
    cpu::attention_fwd<scalar_t>(q, cpu::segments<scalar_t>(kv), Tk, static_cast<scalar_t>(scale), out, lse);
  });
  return {out, lse};
}

// dq and each segment's (dk, dv), summed over the batch where the segment has batch 1.
std::pair<at::Tensor, std::vector<KV>> attention_backward(const at::Tensor& grad_out, const at::Tensor& q_in,
                                                          const std::vector<KV>& kv_in, const at::Tensor& lse,
                                                          double scale) {
  const at::Tensor q = cpu::gemm_ready(q_in);
  const std::vector<KV> kv = gemm_ready(kv_in);
  const at::Tensor g = cpu::gemm_ready(grad_out.to(q.scalar_type()));
  const at::Tensor l = lse.contiguous();
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3), Tk = cpu::total_keys(kv);
  at::Tensor dq = at::empty({B, Tq, H, D}, q.options());
  std::vector<KV> grads;  // per-sample partials for shared segments, summed below (deterministic)
  for (const KV& s : kv) {
    grads.push_back({at::empty({B, s.k.size(1), H, D}, q.options()), at::empty({B, s.k.size(1), H, D}, q.options())});
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "svpt_attention_bwd_cpu", [&] {
    std::vector<cpu::Segment<scalar_t>> segs = cpu::segments<scalar_t>(kv);
    for (size_t i = 0; i < segs.size(); ++i) {
      segs[i].dk = grads[i].k.data_ptr<scalar_t>();
      segs[i].dv = grads[i].v.data_ptr<scalar_t>();
    }
    cpu::attention_bwd<scalar_t>(g, q, segs, Tk, l, static_cast<scalar_t>(scale), dq);
  });
  for (size_t i = 0; i < kv.size(); ++i) {
    if (kv[i].k.size(0) == 1 && B != 1) grads[i] = {grads[i].k.sum(0, true), grads[i].v.sum(0, true)};
  }
  return {dq, grads};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prompt_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, double scale) {
  check_attention(q, k, v);
  check_cpu_dtype(q, "prompt_attention");
  const BelowAutograd below;
  return attention_forward(q, {{k, v}}, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_attention_bwd_cpu(const at::Tensor& grad_out,
                                                                        const at::Tensor& q, const at::Tensor& k,
                                                                        const at::Tensor& v, const at::Tensor& out,
                                                                        const at::Tensor& lse, double scale) {
  check_attention(q, k, v);
  const BelowAutograd below;
  auto [dq, dkv] = attention_backward(grad_out, q, {{k, v}}, lse, scale);
  return {dq, dkv[0].k, dkv[0].v};
}

std::tuple<at::Tensor, at::Tensor> prompt_kv_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& prompt_k,
                                                               const at::Tensor& prompt_v, double scale) {
  check_kv_attention(q, k, v, prompt_k, prompt_v);
  check_cpu_dtype(q, "prompt_kv_attention");
  const BelowAutograd below;
  return attention_forward(q, {{prompt_k, prompt_v}, {k, v}}, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prompt_kv_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prompt_k, const at::Tensor& prompt_v, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  check_kv_attention(q, k, v, prompt_k, prompt_v);
  const BelowAutograd below;
  auto [dq, dkv] = attention_backward(grad_out, q, {{prompt_k, prompt_v}, {k, v}}, lse, scale);
  return {dq, dkv[1].k, dkv[1].v, dkv[0].k, dkv[0].v};
}

}  // namespace svpt
