// attention_saliency on CUDA: AE's saliency from the source query rows alone, no gradient. One
// block per (head, sample); a thread per key of a tile of keys staged in shared memory. For each
// chunk of up to kMaxRows source rows: pass 1 runs each thread's online softmax statistics over its
// keys of all tiles, combined into each row's log-sum-exp by block reductions; pass 2 recomputes the
// scores of the saliency columns and adds the chunk's probabilities, summed over its rows, into the
// (sample, head) partial row (each column owned by one thread: no atomics). The partials
// [B, H, N] are summed over heads by ATen (deterministic). Only the source rows are read as
// queries: 1 class token or the M prompt rows, a sliver of the attention's cost.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/sum.h>

#include <limits>

#include "../svpt.h"
#include "cuda_utils.cuh"

namespace svpt {
namespace {

using namespace cuda_utils;

constexpr int kMaxRows = 8;  // source rows per chunk: 1 (the class token) or 8 (the prompt rows)
constexpr int kMaxHeadDim = 256;

// Keys per tile = threads per block: 128, or 64 for double (the tile then still fits in shared
// memory for head dim 256).
template <typename acc_t>
constexpr int keys_per_tile() {
  return sizeof(acc_t) == 8 ? 64 : 128;
}

template <typename scalar_t, typename acc_t>
__device__ void load_keys(acc_t* sK, const scalar_t* __restrict__ kb, int64_t kst, int k0, int Tk, int D) {
  constexpr int kKeys = keys_per_tile<acc_t>();
  for (int idx = threadIdx.x; idx < kKeys * D; idx += blockDim.x) {
    const int i = idx / D, c = idx - i * D, key = k0 + i;
    sK[i * (D + 1) + c] = key < Tk ? static_cast<acc_t>(kb[key * kst + c]) : acc_t(0);
  }
}

// s[r] <- q row r . the key of this thread (rows past the chunk's are zero rows of sQ).
template <int R, typename acc_t>
__device__ __forceinline__ void scores(const acc_t* sQ, const acc_t* key, int D, acc_t (&s)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) s[r] = 0;
  for (int c = 0; c < D; ++c) {
    const acc_t kc = key[c];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] += sQ[r * D + c] * kc;  // sQ: one address across the warp (broadcast)
  }
}

template <typename scalar_t, typename acc_t, int R>
__global__ void __launch_bounds__(keys_per_tile<acc_t>()) saliency_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, acc_t* __restrict__ part, int Tk, int D,
    Strides qs, Strides ks, acc_t scale, int row_start, int row_count, int col_start) {
  constexpr int kKeys = keys_per_tile<acc_t>();
  extern __shared__ __align__(16) unsigned char smem_raw[];  // aligned for double tiles
  acc_t* sQ = reinterpret_cast<acc_t*>(smem_raw);           // [R][D], scaled
  acc_t* sK = sQ + R * D;                                    // [kKeys][D + 1]: a thread's key row per bank
  __shared__ acc_t scratch[32], sLse[R];
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const scalar_t* qb = q + b * qs.b + h * qs.h;
  const scalar_t* kb = k + b * ks.b + h * ks.h;
  const int ncols = Tk - col_start;
  acc_t* dst = part + (static_cast<int64_t>(b) * gridDim.x + h) * ncols;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int r0 = 0; r0 < row_count; r0 += R) {
    const int rows = min(R, row_count - r0);
    __syncthreads();  // the previous chunk's reads of sQ are done
    for (int idx = tid; idx < R * D; idx += blockDim.x) {
      const int r = idx / D, c = idx - r * D;
      sQ[idx] = r < rows ? static_cast<acc_t>(qb[(row_start + r0 + r) * qs.t + c]) * scale : acc_t(0);
    }
    // Pass 1: this thread's max and sum of exp over its keys, per row.
    acc_t m[R], l[R], s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      m[r] = neg_inf;
      l[r] = 0;
    }
    for (int k0 = 0; k0 < Tk; k0 += kKeys) {
      __syncthreads();
      load_keys(sK, kb, ks.t, k0, Tk, D);
      __syncthreads();
      if (k0 + tid >= Tk) continue;
      scores(sQ, sK + tid * (D + 1), D, s);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const acc_t m_new = max(m[r], s[r]);
        l[r] = l[r] * exp_acc(m[r] - m_new) + exp_acc(s[r] - m_new);
        m[r] = m_new;
      }
    }
    // Each row's log-sum-exp over all keys (threads without keys hold m = -inf, l = 0); `rows` is
    // the same for the whole block, so every thread joins each reduction.
    for (int r = 0; r < rows; ++r) {
      const acc_t row_max = block_max(m[r], scratch);
      const acc_t row_sum = block_sum(m[r] == neg_inf ? acc_t(0) : l[r] * exp_acc(m[r] - row_max), scratch);
      if (tid == 0) sLse[r] = row_max + log_acc(row_sum);
    }
    // Pass 2: the chunk's probabilities of the saliency columns, summed over its rows.
    for (int k0 = col_start; k0 < Tk; k0 += kKeys) {
      __syncthreads();  // also publishes sLse
      load_keys(sK, kb, ks.t, k0, Tk, D);
      __syncthreads();
      const int key = k0 + tid;
      if (key >= Tk) continue;
      scores(sQ, sK + tid * (D + 1), D, s);
      acc_t total = 0;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < rows) total += exp_acc(s[r] - sLse[r]);  // rows past the chunk's: zero queries, skipped
      }
      acc_t* out = dst + (key - col_start);
      *out = r0 == 0 ? total : *out + total;  // the same thread owns this column in every chunk
    }
  }
}

}  // namespace

at::Tensor attention_saliency_cuda(const at::Tensor& q_in, const at::Tensor& k_in, double scale, int64_t row_start,
                                   int64_t row_count, int64_t col_start) {
  check_saliency(q_in, k_in, row_start, row_count, col_start);
  const BelowAutograd below;
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(2), D = q_in.size(3), Tk = k_in.size(1);
  TORCH_CHECK(D <= kMaxHeadDim, "svpt attention_saliency (CUDA kernels): head dim ", D, " > ", kMaxHeadDim);
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const auto acc = at::toAccumulateType(q.scalar_type(), /*is_cuda=*/true);
  at::Tensor part = at::empty({B, H, Tk - col_start}, q.options().dtype(acc));
  if (part.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "svpt_attention_saliency_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      constexpr int kKeys = keys_per_tile<acc_t>();
      auto launch = [&](auto kernel, int rows_per_chunk) {
        const size_t smem = (rows_per_chunk * D + kKeys * (D + 1)) * sizeof(acc_t);
        set_smem(kernel, smem);
        kernel<<<dim3(static_cast<unsigned int>(H), static_cast<unsigned int>(B)), kKeys, smem,
                 c10::cuda::getCurrentCUDAStream()>>>(
            q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), part.data_ptr<acc_t>(), static_cast<int>(Tk),
            static_cast<int>(D), strides_of(q, false), strides_of(k, k.size(0) == 1 && B > 1),
            static_cast<acc_t>(scale), static_cast<int>(row_start), static_cast<int>(row_count),
            static_cast<int>(col_start));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (row_count == 1) {
        launch(saliency_kernel<scalar_t, acc_t, 1>, 1);
      } else {
        launch(saliency_kernel<scalar_t, acc_t, kMaxRows>, kMaxRows);
      }
    });
  }
  return (part.sum(1) / double(H * row_count)).to(at::kFloat);
}

}  // namespace svpt
