// prompt_attention and prompt_kv_attention on CUDA: flash-attention style kernels,
// fp32/fp64/fp16/bf16 inputs with float (double for fp64) accumulation, head dim up to 128,
// any Tq/Tk (tiles are masked). The keys/values come as one segment (prompt_attention) or two
// (prompt_kv_attention: the prompt segment, then the tokens' own), never concatenated: the
// forward and dQ kernels run their online softmax over the tiles of each segment in turn, the
// dK/dV kernel runs once per segment.
//
// Every kernel works on 32 x 32 tiles of (query rows x key columns) with 4 warps; each warp
// owns 8 rows of the "owned" side (query rows in the forward and dQ kernels, key rows in
// the dK/dV kernel), lanes run over the other side, and the 32 x 32 block of probabilities
// goes through shared memory. Nothing T x T is stored: the forward keeps the log-sum-exp,
// the backward recomputes the probabilities (dQ and dK/dV in two kernels, so no atomics and
// deterministic results). 16-bit attention of the methods runs on PyTorch's fused attention
// instead (svpt_kernels/cpp.py: PREFER, and the FlashAttention path of prompt_kv_attention).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>

#include <limits>
#include <vector>

#include "../svpt.h"
#include "cuda_utils.cuh"

namespace svpt {
namespace {

using namespace cuda_utils;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 32;
constexpr int kRows = kTile / kWarps;  // rows owned by one warp
constexpr int kMaxHeadDim = 128;

constexpr int kMaxSegments = 2;

// The keys/values of the forward and dQ kernels: up to two segments, read one after the other.
template <typename scalar_t>
struct Segments {
  const scalar_t* k[kMaxSegments];
  const scalar_t* v[kMaxSegments];
  Strides ks[kMaxSegments], vs[kMaxSegments];
  int len[kMaxSegments];
  int count;
};

// tile[i][c] (row stride dp) <- src rows row0 + i, zero past `rows`.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(acc_t* tile, const scalar_t* __restrict__ src, int64_t row_stride, int row0,
                                          int rows, int d, int dp) {
  for (int idx = threadIdx.x; idx < kTile * d; idx += blockDim.x) {
    const int i = idx / d, c = idx - i * d, r = row0 + i;
    tile[i * dp + c] = r < rows ? static_cast<acc_t>(src[r * row_stride + c]) : acc_t(0);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t* a, const acc_t* b, int d) {
  acc_t s = 0;
  for (int c = 0; c < d; ++c) s += a[c] * b[c];
  return s;
}

template <typename scalar_t, typename acc_t, int NC>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const scalar_t* __restrict__ q,
                                                            const Segments<scalar_t> kv, scalar_t* __restrict__ out,
                                                            acc_t* __restrict__ lse, int Tq, int H, int D, Strides qs,
                                                            acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // aligned for double tiles
  const int dp = D + 1;  // padded rows: lanes reading different rows hit different banks
  acc_t* sQ = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sK = sQ + kTile * dp;
  acc_t* sV = sK + kTile * dp;
  acc_t* sP = sV + kTile * dp;  // [query row][key], stride kTile + 1
  const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_tile(sQ, q + b * qs.b + h * qs.h, qs.t, q0, Tq, D, dp);

  acc_t m[kRows], l[kRows], acc[kRows][NC];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -std::numeric_limits<acc_t>::infinity();
    l[r] = 0;
#pragma unroll
    for (int cc = 0; cc < NC; ++cc) acc[r][cc] = 0;
  }
  for (int seg = 0; seg < kv.count; ++seg) {
    const scalar_t* kb = kv.k[seg] + b * kv.ks[seg].b + h * kv.ks[seg].h;
    const scalar_t* vb = kv.v[seg] + b * kv.vs[seg].b + h * kv.vs[seg].h;
    const int Tk = kv.len[seg];
    for (int k0 = 0; k0 < Tk; k0 += kTile) {
      __syncthreads();  // the previous tile is consumed
      load_tile(sK, kb, kv.ks[seg].t, k0, Tk, D, dp);
      load_tile(sV, vb, kv.vs[seg].t, k0, Tk, D, dp);
      __syncthreads();
      const bool valid = k0 + lane < Tk;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int i = warp * kRows + r;
        const acc_t s = valid ? dot(sQ + i * dp, sK + lane * dp, D) * scale : -std::numeric_limits<acc_t>::infinity();
        const acc_t m_new = max(m[r], warp_max(s));  // finite: lane 0 is always a valid key
        const acc_t p = valid ? exp_acc(s - m_new) : acc_t(0);
        const acc_t alpha = exp_acc(m[r] - m_new);
        l[r] = l[r] * alpha + warp_sum(p);
        m[r] = m_new;
        sP[i * (kTile + 1) + lane] = p;
#pragma unroll
        for (int cc = 0; cc < NC; ++cc) acc[r][cc] *= alpha;
      }
      __syncwarp();
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int i = warp * kRows + r;
        for (int j = 0; j < kTile; ++j) {
          const acc_t p = sP[i * (kTile + 1) + j];
#pragma unroll
          for (int cc = 0; cc < NC; ++cc) {
            const int c = lane + 32 * cc;
            if (c < D) acc[r][cc] += p * sV[j * dp + c];
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int t = q0 + warp * kRows + r;
    if (t >= Tq) continue;
    const acc_t inv = acc_t(1) / l[r];
    scalar_t* o = out + ((static_cast<int64_t>(b) * Tq + t) * H + h) * D;
#pragma unroll
    for (int cc = 0; cc < NC; ++cc) {
      const int c = lane + 32 * cc;
      if (c < D) o[c] = static_cast<scalar_t>(acc[r][cc] * inv);
    }
    if (lane == 0) lse[(static_cast<int64_t>(b) * H + h) * Tq + t] = m[r] + log_acc(l[r]);
  }
}

template <typename scalar_t, typename acc_t, int NC>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(
    const scalar_t* __restrict__ q, const Segments<scalar_t> kv, const scalar_t* __restrict__ g,
    const acc_t* __restrict__ lse, const acc_t* __restrict__ di, scalar_t* __restrict__ dq, int Tq, int H, int D,
    Strides qs, Strides gs, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // aligned for double tiles
  const int dp = D + 1;
  acc_t* sQ = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sG = sQ + kTile * dp;
  acc_t* sK = sG + kTile * dp;
  acc_t* sV = sK + kTile * dp;
  acc_t* sS = sV + kTile * dp;  // dS [query row][key]
  const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_tile(sQ, q + b * qs.b + h * qs.h, qs.t, q0, Tq, D, dp);
  load_tile(sG, g + b * gs.b + h * gs.h, gs.t, q0, Tq, D, dp);
  acc_t row_lse[kRows], row_di[kRows], acc[kRows][NC];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int t = q0 + warp * kRows + r;
    const int64_t at = (static_cast<int64_t>(b) * H + h) * Tq + t;
    row_lse[r] = t < Tq ? lse[at] : acc_t(0);  // rows past Tq are computed but never written
    row_di[r] = t < Tq ? di[at] : acc_t(0);
#pragma unroll
    for (int cc = 0; cc < NC; ++cc) acc[r][cc] = 0;
  }
  for (int seg = 0; seg < kv.count; ++seg) {
    const scalar_t* kb = kv.k[seg] + b * kv.ks[seg].b + h * kv.ks[seg].h;
    const scalar_t* vb = kv.v[seg] + b * kv.vs[seg].b + h * kv.vs[seg].h;
    const int Tk = kv.len[seg];
    for (int k0 = 0; k0 < Tk; k0 += kTile) {
      __syncthreads();
      load_tile(sK, kb, kv.ks[seg].t, k0, Tk, D, dp);
      load_tile(sV, vb, kv.vs[seg].t, k0, Tk, D, dp);
      __syncthreads();
      const bool valid = k0 + lane < Tk;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int i = warp * kRows + r;
        acc_t ds = 0;
        if (valid) {
          const acc_t p = exp_acc(dot(sQ + i * dp, sK + lane * dp, D) * scale - row_lse[r]);
          ds = p * (dot(sG + i * dp, sV + lane * dp, D) - row_di[r]);
        }
        sS[i * (kTile + 1) + lane] = ds;
      }
      __syncwarp();
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int i = warp * kRows + r;
        for (int j = 0; j < kTile; ++j) {
          const acc_t ds = sS[i * (kTile + 1) + j];
#pragma unroll
          for (int cc = 0; cc < NC; ++cc) {
            const int c = lane + 32 * cc;
            if (c < D) acc[r][cc] += ds * sK[j * dp + c];
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int t = q0 + warp * kRows + r;
    if (t >= Tq) continue;
    scalar_t* o = dq + ((static_cast<int64_t>(b) * Tq + t) * H + h) * D;
#pragma unroll
    for (int cc = 0; cc < NC; ++cc) {
      const int c = lane + 32 * cc;
      if (c < D) o[c] = static_cast<scalar_t>(acc[r][cc] * scale);
    }
  }
}

// dK, dV of one 32-key tile for sample b (partials when k/v are broadcast over the batch).
template <typename scalar_t, typename acc_t, int NC>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    const scalar_t* __restrict__ g, const acc_t* __restrict__ lse, const acc_t* __restrict__ di,
    acc_t* __restrict__ dk, acc_t* __restrict__ dv, int Tq, int Tk, int H, int D, Strides qs, Strides ks, Strides vs,
    Strides gs, acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // aligned for double tiles
  const int dp = D + 1;
  acc_t* sK = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sV = sK + kTile * dp;
  acc_t* sQ = sV + kTile * dp;
  acc_t* sG = sQ + kTile * dp;
  acc_t* sP = sG + kTile * dp;         // P  [key][query row], stride kTile + 1
  acc_t* sS = sP + kTile * (kTile + 1);  // dS [key][query row]
  acc_t* sL = sS + kTile * (kTile + 1);
  acc_t* sD = sL + kTile;
  const int b = blockIdx.z, h = blockIdx.y, k0 = blockIdx.x * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const scalar_t* qb = q + b * qs.b + h * qs.h;
  const scalar_t* gb = g + b * gs.b + h * gs.h;
  load_tile(sK, k + b * ks.b + h * ks.h, ks.t, k0, Tk, D, dp);
  load_tile(sV, v + b * vs.b + h * vs.h, vs.t, k0, Tk, D, dp);
  acc_t adk[kRows][NC], adv[kRows][NC];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int cc = 0; cc < NC; ++cc) adk[r][cc] = adv[r][cc] = 0;
  for (int q0 = 0; q0 < Tq; q0 += kTile) {
    __syncthreads();
    load_tile(sQ, qb, qs.t, q0, Tq, D, dp);
    load_tile(sG, gb, gs.t, q0, Tq, D, dp);
    if (threadIdx.x < kTile) {
      const int t = q0 + threadIdx.x;
      const int64_t at = (static_cast<int64_t>(b) * H + h) * Tq + t;
      sL[threadIdx.x] = t < Tq ? lse[at] : acc_t(0);
      sD[threadIdx.x] = t < Tq ? di[at] : acc_t(0);
    }
    __syncthreads();
    const bool row_valid = q0 + lane < Tq;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int j = warp * kRows + r;
      acc_t p = 0, ds = 0;
      if (row_valid && k0 + j < Tk) {
        p = exp_acc(dot(sQ + lane * dp, sK + j * dp, D) * scale - sL[lane]);
        ds = p * (dot(sG + lane * dp, sV + j * dp, D) - sD[lane]);
      }
      sP[j * (kTile + 1) + lane] = p;
      sS[j * (kTile + 1) + lane] = ds;
    }
    __syncwarp();
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int j = warp * kRows + r;
      for (int i = 0; i < kTile; ++i) {
        const acc_t p = sP[j * (kTile + 1) + i], ds = sS[j * (kTile + 1) + i];
#pragma unroll
        for (int cc = 0; cc < NC; ++cc) {
          const int c = lane + 32 * cc;
          if (c < D) {
            adv[r][cc] += p * sG[i * dp + c];
            adk[r][cc] += ds * sQ[i * dp + c];
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int key = k0 + warp * kRows + r;
    if (key >= Tk) continue;
    const int64_t base = ((static_cast<int64_t>(b) * Tk + key) * H + h) * D;
#pragma unroll
    for (int cc = 0; cc < NC; ++cc) {
      const int c = lane + 32 * cc;
      if (c < D) {
        dk[base + c] = adk[r][cc] * scale;
        dv[base + c] = adv[r][cc];
      }
    }
  }
}

at::Tensor unit_stride_d(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

template <typename F>
void dispatch_head_dim(int64_t D, const F& f) {
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, "svpt prompt_attention (CUDA kernels): head dim ", D,
              " is not supported (1..", kMaxHeadDim, ")");
  // Two register-tile widths only: each extra one costs ~a minute of nvcc time per build.
  if (D <= 64) return f(std::integral_constant<int, 2>());
  return f(std::integral_constant<int, 4>());
}

// The keys/values of a launch; a segment with batch 1 is read by every sample (batch stride 0).
template <typename scalar_t>
Segments<scalar_t> segments_of(const std::vector<KV>& kv, int64_t batch) {
  TORCH_CHECK(kv.size() >= 1 && kv.size() <= kMaxSegments, "svpt attention (CUDA kernels): 1 or 2 key segments");
  Segments<scalar_t> s{};
  s.count = static_cast<int>(kv.size());
  for (int i = 0; i < s.count; ++i) {
    const bool bcast = kv[i].k.size(0) == 1 && batch > 1;
    s.k[i] = kv[i].k.data_ptr<scalar_t>();
    s.v[i] = kv[i].v.data_ptr<scalar_t>();
    s.ks[i] = strides_of(kv[i].k, bcast);
    s.vs[i] = strides_of(kv[i].v, bcast);
    s.len[i] = static_cast<int>(kv[i].k.size(1));
  }
  return s;
}

std::vector<KV> unit_stride_kv(const std::vector<KV>& kv) {
  std::vector<KV> out;
  for (const KV& s : kv) out.push_back({unit_stride_d(s.k), unit_stride_d(s.v)});
  return out;
}

void check_same_dtype(const at::Tensor& q, const std::vector<KV>& kv) {
  for (const KV& s : kv) {
    TORCH_CHECK(s.k.scalar_type() == q.scalar_type() && s.v.scalar_type() == q.scalar_type(),
                "svpt attention (CUDA kernels): q, k, v dtypes differ");
  }
}

// out [B, Tq, H, D] and lse [B, H, Tq] (accumulation dtype) of q's attention over the segments.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const std::vector<KV>& kv, double scale) {
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const auto acc_type = at::toAccumulateType(q.scalar_type(), /*is_cuda=*/true);
  at::Tensor out = at::empty({B, Tq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(acc_type));
  if (B == 0 || Tq == 0) return {out, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "svpt_attention_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    dispatch_head_dim(D, [&](auto nc) {
      constexpr int NC = decltype(nc)::value;
      auto kernel = attn_fwd_kernel<scalar_t, acc_t, NC>;
      const size_t smem = (3 * kTile * (D + 1) + kTile * (kTile + 1)) * sizeof(acc_t);
      set_smem(kernel, smem);
      const dim3 grid((Tq + kTile - 1) / kTile, H, B);
      kernel<<<grid, kThreads, smem, stream>>>(q.data_ptr<scalar_t>(), segments_of<scalar_t>(kv, B),
                                               out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), Tq, H, D,
                                               strides_of(q, false), static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

// dq and each segment's (dk, dv) in the segment's dtype, summed over the batch where the
// segment has batch 1 (per-sample partials, then a sum: deterministic, no atomics).
std::pair<at::Tensor, std::vector<KV>> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                          const std::vector<KV>& kv, const at::Tensor& out,
                                                          const at::Tensor& lse_in, double scale) {
  const at::Tensor g = unit_stride_d(grad_out.to(q.scalar_type()));
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const auto acc_type = at::toAccumulateType(q.scalar_type(), /*is_cuda=*/true);
  const at::Tensor lse = lse_in.to(acc_type).contiguous();
  // D_i = rowsum(dO * O), [B, H, Tq]: a small reduction, left to ATen.
  const at::Tensor di = (g.to(acc_type) * out.to(acc_type)).sum(-1).permute({0, 2, 1}).contiguous();
  at::Tensor dq = at::empty({B, Tq, H, D}, q.options());
  std::vector<KV> grads;
  for (const KV& s : kv) {
    const auto opts = q.options().dtype(acc_type);
    grads.push_back({at::empty({B, s.k.size(1), H, D}, opts), at::empty({B, s.k.size(1), H, D}, opts)});
  }
  if (B > 0 && Tq > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "svpt_attention_bwd_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      dispatch_head_dim(D, [&](auto nc) {
        constexpr int NC = decltype(nc)::value;
        {
          auto kernel = attn_bwd_dq_kernel<scalar_t, acc_t, NC>;
          const size_t smem = (4 * kTile * (D + 1) + kTile * (kTile + 1)) * sizeof(acc_t);
          set_smem(kernel, smem);
          const dim3 grid((Tq + kTile - 1) / kTile, H, B);
          kernel<<<grid, kThreads, smem, stream>>>(q.data_ptr<scalar_t>(), segments_of<scalar_t>(kv, B),
                                                   g.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), di.data_ptr<acc_t>(),
                                                   dq.data_ptr<scalar_t>(), Tq, H, D, strides_of(q, false),
                                                   strides_of(g, false), static_cast<acc_t>(scale));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        auto kernel = attn_bwd_dkdv_kernel<scalar_t, acc_t, NC>;
        const size_t smem = (4 * kTile * (D + 1) + 2 * kTile * (kTile + 1) + 2 * kTile) * sizeof(acc_t);
        set_smem(kernel, smem);
        for (size_t i = 0; i < kv.size(); ++i) {  // one launch per key segment
          const at::Tensor &k = kv[i].k, &v = kv[i].v;
          const int64_t Tk = k.size(1);
          const bool bcast = k.size(0) == 1 && B > 1;
          const dim3 grid((Tk + kTile - 1) / kTile, H, B);
          kernel<<<grid, kThreads, smem, stream>>>(
              q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
              lse.data_ptr<acc_t>(), di.data_ptr<acc_t>(), grads[i].k.data_ptr<acc_t>(), grads[i].v.data_ptr<acc_t>(),
              Tq, Tk, H, D, strides_of(q, false), strides_of(k, bcast), strides_of(v, bcast), strides_of(g, false),
              static_cast<acc_t>(scale));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  } else {
    dq.zero_();
    for (KV& d : grads) {
      d.k.zero_();
      d.v.zero_();
    }
  }
  for (size_t i = 0; i < kv.size(); ++i) {
    KV& d = grads[i];
    if (kv[i].k.size(0) == 1 && B != 1) d = {d.k.sum(0, true), d.v.sum(0, true)};
    d = {d.k.to(kv[i].k.scalar_type()), d.v.to(kv[i].v.scalar_type())};
  }
  return {dq, grads};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prompt_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                            const at::Tensor& v_in, double scale) {
  check_attention(q_in, k_in, v_in);
  const BelowAutograd below;
  const std::vector<KV> kv = unit_stride_kv({{k_in, v_in}});
  const at::Tensor q = unit_stride_d(q_in);
  check_same_dtype(q, kv);
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_forward(q, kv, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prompt_attention_bwd_cuda(const at::Tensor& grad_out,
                                                                         const at::Tensor& q_in, const at::Tensor& k_in,
                                                                         const at::Tensor& v_in, const at::Tensor& out,
                                                                         const at::Tensor& lse, double scale) {
  check_attention(q_in, k_in, v_in);
  const BelowAutograd below;
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto [dq, dkv] = attention_backward(grad_out, unit_stride_d(q_in), unit_stride_kv({{k_in, v_in}}), out, lse, scale);
  return {dq, dkv[0].k, dkv[0].v};
}

std::tuple<at::Tensor, at::Tensor> prompt_kv_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& prompt_k,
                                                                const at::Tensor& prompt_v, double scale) {
  check_kv_attention(q_in, k, v, prompt_k, prompt_v);
  const BelowAutograd below;
  const c10::cuda::CUDAGuard guard(q_in.device());
  return attention_forward(unit_stride_d(q_in), unit_stride_kv({{prompt_k, prompt_v}, {k, v}}), scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prompt_kv_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prompt_k, const at::Tensor& prompt_v, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  check_kv_attention(q, k, v, prompt_k, prompt_v);
  const BelowAutograd below;
  const c10::cuda::CUDAGuard guard(q.device());
  auto [dq, dkv] =
      attention_backward(grad_out, unit_stride_d(q), unit_stride_kv({{prompt_k, prompt_v}, {k, v}}), out, lse, scale);
  return {dq, dkv[1].k, dkv[1].v, dkv[0].k, dkv[0].v};
}

}  // namespace svpt
