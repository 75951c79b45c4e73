// da_mix on CUDA, in place on the M prompt rows (svpt/ops.py): one block per prompt row. The
// forward reduces the row's two gate dot products in the block, keeps the row's old value for
// backward and writes the mix over it; no other row is read or written. The backward recomputes
// the gate, rewrites the prompt rows of the incoming gradient in place, and writes per-row
// partials (dL/dP rows, dL/dlogit); the weight gradients are column sums over the B*M rows done by
// a second kernel in fixed-size row chunks, then summed by ATen (deterministic, no atomics).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/sum.h>

#include "../svpt.h"
#include "cuda_utils.cuh"

namespace svpt {
namespace {

using namespace cuda_utils;

constexpr int kThreads = 128;
constexpr int kReduceThreads = 256;
constexpr int kRowsPerChunk = 64;  // rows of the weight-gradient sums per block

// Row r = b * M + m of the prompts and of a [B, T, d] buffer (element offsets).
struct Rows {
  int64_t buf_b, buf_t, prompt_b, prompt_m;
  int num_prefix, M;
  __device__ int64_t buffer(int64_t r) const { return (r / M) * buf_b + (num_prefix + r % M) * buf_t; }
  __device__ int64_t prompt(int64_t r) const { return (r / M) * prompt_b + (r % M) * prompt_m; }
};

Rows rows_of(const at::Tensor& buffer, const at::Tensor& prompts, int64_t num_prefix) {
  return {buffer.stride(0), buffer.stride(1), prompts.size(0) == 1 ? 0 : prompts.stride(0), prompts.stride(1),
          static_cast<int>(num_prefix), static_cast<int>(prompts.size(1))};
}

// sigmoid(x . w0 + p . w1 + b) of one row, every thread of the block gets it.
template <typename scalar_t, typename acc_t>
__device__ acc_t gate_of(const scalar_t* x, const scalar_t* p, const acc_t* w, acc_t bias, int d, acc_t* scratch) {
  acc_t s = 0;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    s += static_cast<acc_t>(x[c]) * w[c] + static_cast<acc_t>(p[c]) * w[d + c];
  }
  s = block_sum(s, scratch) + bias;
  return acc_t(1) / (acc_t(1) + exp_acc(-s));  // bias = -inf gives 0: the row becomes P
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) da_mix_fwd_kernel(scalar_t* __restrict__ tok,
                                                              const scalar_t* __restrict__ pr,
                                                              const acc_t* __restrict__ w,
                                                              const acc_t* __restrict__ bias,
                                                              scalar_t* __restrict__ prev, Rows rows, int d) {
  __shared__ acc_t scratch[32];
  const int64_t r = blockIdx.x;
  scalar_t* x = tok + rows.buffer(r);
  const scalar_t* p = pr + rows.prompt(r);
  const acc_t g = gate_of(x, p, w, bias[0], d, scratch);
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const scalar_t old = x[c];
    prev[r * d + c] = old;
    x[c] = static_cast<scalar_t>(g * static_cast<acc_t>(old) + (acc_t(1) - g) * static_cast<acc_t>(p[c]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) da_mix_bwd_kernel(scalar_t* __restrict__ grad,
                                                              const scalar_t* __restrict__ prev,
                                                              const scalar_t* __restrict__ pr,
                                                              const acc_t* __restrict__ w,
                                                              const acc_t* __restrict__ bias,
                                                              acc_t* __restrict__ dprompt_rows,
                                                              acc_t* __restrict__ dlogit, Rows rows, int d) {
  __shared__ acc_t scratch[32];
  const int64_t r = blockIdx.x;
  scalar_t* go = grad + rows.buffer(r);
  const scalar_t* x = prev + r * d;
  const scalar_t* p = pr + rows.prompt(r);
  const acc_t g = gate_of(x, p, w, bias[0], d, scratch);
  acc_t dg = 0;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    dg += static_cast<acc_t>(go[c]) * (static_cast<acc_t>(x[c]) - static_cast<acc_t>(p[c]));
  }
  const acc_t ds = block_sum(dg, scratch) * g * (acc_t(1) - g);  // dL/d(gate logit)
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const acc_t gc = static_cast<acc_t>(go[c]);
    dprompt_rows[r * d + c] = (acc_t(1) - g) * gc + ds * w[d + c];
    go[c] = static_cast<scalar_t>(g * gc + ds * w[c]);
  }
  if (threadIdx.x == 0) dlogit[r] = ds;
}

// part[chunk, 0, c] = sum over the chunk's rows of dlogit[r] * prev[r, c]; part[chunk, 1, c] the
// same with the prompts' row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) weight_grad_kernel(const scalar_t* __restrict__ prev,
                                                                     const scalar_t* __restrict__ pr,
                                                                     const acc_t* __restrict__ dlogit,
                                                                     acc_t* __restrict__ part, Rows rows,
                                                                     int64_t total_rows, int d) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRowsPerChunk;
  const int64_t r1 = min(r0 + kRowsPerChunk, total_rows);
  acc_t a0 = 0, a1 = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t ds = dlogit[r];
    a0 += ds * static_cast<acc_t>(prev[r * d + c]);
    a1 += ds * static_cast<acc_t>(pr[rows.prompt(r) + c]);
  }
  acc_t* dst = part + static_cast<int64_t>(blockIdx.y) * 2 * d;
  dst[c] = a0;
  dst[d + c] = a1;
}

at::Tensor prompts_ready(const at::Tensor& prompts) { return prompts.stride(2) == 1 ? prompts : prompts.contiguous(); }

}  // namespace

at::Tensor da_mix_fwd_cuda(at::Tensor& tokens, const at::Tensor& prompts_in, const at::Tensor& weight,
                           const at::Tensor& bias, int64_t num_prefix) {
  check_da_mix(tokens, prompts_in, weight, bias, num_prefix);
  const BelowAutograd below;
  const c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor prompts = prompts_ready(prompts_in);
  const int64_t B = tokens.size(0), d = tokens.size(2), M = prompts.size(1);
  at::Tensor prev = at::empty({B, M, d}, tokens.options());
  if (prev.numel() == 0) return prev;
  const auto acc = at::toAccumulateType(tokens.scalar_type(), /*is_cuda=*/true);
  const at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).reshape({1});  // on the device: no sync
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "svpt_da_mix_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    da_mix_fwd_kernel<scalar_t, acc_t><<<B * M, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        tokens.data_ptr<scalar_t>(), prompts.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), b.data_ptr<acc_t>(),
        prev.data_ptr<scalar_t>(), rows_of(tokens, prompts, num_prefix), static_cast<int>(d));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return prev;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> da_mix_bwd_cuda(at::Tensor& grad, const at::Tensor& prev_in,
                                                               const at::Tensor& prompts_in, const at::Tensor& weight,
                                                               const at::Tensor& bias, int64_t num_prefix) {
  check_da_mix_bwd(grad, prev_in, prompts_in, weight, bias, num_prefix);
  const BelowAutograd below;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor prev = prev_in.contiguous(), prompts = prompts_ready(prompts_in);
  const int64_t B = grad.size(0), d = grad.size(2), M = prompts.size(1), rows = B * M;
  const auto acc = at::toAccumulateType(grad.scalar_type(), /*is_cuda=*/true);
  const auto opts = grad.options().dtype(acc);
  const at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).reshape({1});
  at::Tensor dprompt_rows = at::empty({B, M, d}, opts), dlogit = at::empty({rows}, opts);  // all written
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  at::Tensor part = at::empty({chunks, 2, d}, opts);
  if (rows > 0 && d > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    const Rows layout = rows_of(grad, prompts, num_prefix);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "svpt_da_mix_bwd_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      da_mix_bwd_kernel<scalar_t, acc_t><<<rows, kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), prev.data_ptr<scalar_t>(), prompts.data_ptr<scalar_t>(), w.data_ptr<acc_t>(),
          b.data_ptr<acc_t>(), dprompt_rows.data_ptr<acc_t>(), dlogit.data_ptr<acc_t>(), layout, static_cast<int>(d));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 grid(static_cast<unsigned int>((d + kReduceThreads - 1) / kReduceThreads),
                      static_cast<unsigned int>(chunks));
      weight_grad_kernel<scalar_t, acc_t><<<grid, kReduceThreads, 0, stream>>>(
          prev.data_ptr<scalar_t>(), prompts.data_ptr<scalar_t>(), dlogit.data_ptr<acc_t>(), part.data_ptr<acc_t>(),
          layout, rows, static_cast<int>(d));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor grad_prompts = prompts.size(0) == 1 ? dprompt_rows.sum(0, true) : dprompt_rows;
  return {grad_prompts.to(prompts.scalar_type()), part.sum(0).to(weight.scalar_type()),
          dlogit.sum().to(bias.scalar_type()).reshape(bias.sizes())};
}

}  // namespace svpt
