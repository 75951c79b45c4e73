// da_mix on CUDA: one block per token row. Prompt rows reduce their two gate dot products
// in the block and write the mix; other rows are copied. The backward recomputes the gate
// and writes per-row partials of the weight / bias / (broadcast) prompt gradients, which
// ATen sums afterwards (deterministic, no atomics).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>

#include "../svpt.h"
#include "cuda_utils.cuh"

namespace svpt {
namespace {

using namespace cuda_utils;

constexpr int kThreads = 128;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) da_mix_fwd_kernel(const scalar_t* __restrict__ tok,
                                                              const scalar_t* __restrict__ pr,
                                                              const scalar_t* __restrict__ w,
                                                              const scalar_t* __restrict__ bias,
                                                              scalar_t* __restrict__ out, int T, int d, int M, int np,
                                                              bool p_bcast) {
  __shared__ acc_t scratch[32];
  const int64_t row = blockIdx.x;
  const int b = row / T, t = row % T;
  const scalar_t* src = tok + row * d;
  scalar_t* dst = out + row * d;
  if (t < np || t >= np + M) {
    for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
    return;
  }
  const scalar_t* p = pr + (static_cast<int64_t>(p_bcast ? 0 : b) * M + (t - np)) * d;
  acc_t s = 0;
  for (int c = threadIdx.x; c < d; c += blockDim.x)
    s += static_cast<acc_t>(src[c]) * static_cast<acc_t>(w[c]) + static_cast<acc_t>(p[c]) * static_cast<acc_t>(w[d + c]);
  s = block_sum(s, scratch) + static_cast<acc_t>(bias[0]);
  const acc_t gate = acc_t(1) / (acc_t(1) + exp_acc(-s));
  for (int c = threadIdx.x; c < d; c += blockDim.x)
    dst[c] = static_cast<scalar_t>(gate * static_cast<acc_t>(src[c]) + (acc_t(1) - gate) * static_cast<acc_t>(p[c]));
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) da_mix_bwd_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ tok, const scalar_t* __restrict__ pr,
    const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias, scalar_t* __restrict__ dtok,
    acc_t* __restrict__ dprompt, acc_t* __restrict__ dweight, acc_t* __restrict__ dsum, int T, int d, int M, int np,
    bool p_bcast) {
  __shared__ acc_t scratch[32];
  const int64_t row = blockIdx.x;
  const int b = row / T, t = row % T;
  const scalar_t* g = grad + row * d;
  scalar_t* dst = dtok + row * d;
  if (t < np || t >= np + M) {
    for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = g[c];
    return;
  }
  const int m = t - np;
  const scalar_t* prev = tok + row * d;
  const scalar_t* p = pr + (static_cast<int64_t>(p_bcast ? 0 : b) * M + m) * d;
  acc_t s = 0, dgate = 0;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const acc_t x = static_cast<acc_t>(prev[c]), y = static_cast<acc_t>(p[c]);
    s += x * static_cast<acc_t>(w[c]) + y * static_cast<acc_t>(w[d + c]);
    dgate += static_cast<acc_t>(g[c]) * (x - y);
  }
  s = block_sum(s, scratch) + static_cast<acc_t>(bias[0]);
  dgate = block_sum(dgate, scratch);
  const acc_t gate = acc_t(1) / (acc_t(1) + exp_acc(-s));
  const acc_t ds = dgate * gate * (acc_t(1) - gate);
  const int64_t pm = static_cast<int64_t>(b) * M + m;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const acc_t gc = static_cast<acc_t>(g[c]);
    dst[c] = static_cast<scalar_t>(gc * gate + ds * static_cast<acc_t>(w[c]));
    dprompt[pm * d + c] = gc * (acc_t(1) - gate) + ds * static_cast<acc_t>(w[d + c]);
    dweight[pm * 2 * d + c] = ds * static_cast<acc_t>(prev[c]);
    dweight[pm * 2 * d + d + c] = ds * static_cast<acc_t>(p[c]);
  }
  if (threadIdx.x == 0) dsum[pm] = ds;
}

}  // namespace

at::Tensor da_mix_fwd_cuda(const at::Tensor& tokens_in, const at::Tensor& prompts_in, const at::Tensor& weight_in,
                           const at::Tensor& bias_in, int64_t num_prefix) {
  check_da_mix(tokens_in, prompts_in, weight_in, bias_in, num_prefix);
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), prompts = prompts_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.reshape({1}).contiguous();
  const int64_t B = tokens.size(0), T = tokens.size(1), d = tokens.size(2), M = prompts.size(1);
  at::Tensor out = at::empty_like(tokens);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "svpt_da_mix_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    da_mix_fwd_kernel<scalar_t, acc_t><<<B * T, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        tokens.data_ptr<scalar_t>(), prompts.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), T, d, M, num_prefix, prompts.size(0) == 1 && B > 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> da_mix_bwd_cuda(const at::Tensor& grad_in,
                                                                           const at::Tensor& tokens_in,
                                                                           const at::Tensor& prompts_in,
                                                                           const at::Tensor& weight_in,
                                                                           const at::Tensor& bias_in,
                                                                           int64_t num_prefix) {
  check_da_mix(tokens_in, prompts_in, weight_in, bias_in, num_prefix);
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), prompts = prompts_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.reshape({1}).contiguous();
  const at::Tensor grad = grad_in.to(tokens.scalar_type()).contiguous();
  const int64_t B = tokens.size(0), T = tokens.size(1), d = tokens.size(2), M = prompts.size(1);
  const auto acc_type = at::toAccumulateType(tokens.scalar_type(), /*is_cuda=*/true);
  at::Tensor dtokens = at::empty_like(tokens);
  at::Tensor dprompts = at::zeros({B, M, d}, tokens.options().dtype(acc_type));
  at::Tensor dweight = at::zeros({B, M, 2, d}, tokens.options().dtype(acc_type));
  at::Tensor dsum = at::zeros({B, M}, tokens.options().dtype(acc_type));
  if (dtokens.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "svpt_da_mix_bwd_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      da_mix_bwd_kernel<scalar_t, acc_t><<<B * T, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad.data_ptr<scalar_t>(), tokens.data_ptr<scalar_t>(), prompts.data_ptr<scalar_t>(),
          weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), dtokens.data_ptr<scalar_t>(), dprompts.data_ptr<acc_t>(),
          dweight.data_ptr<acc_t>(), dsum.data_ptr<acc_t>(), T, d, M, num_prefix, prompts.size(0) == 1 && B > 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (prompts.size(0) == 1) dprompts = dprompts.sum(0, true);
  // (sum over one dim: a braced {0, 1} is ambiguous with DimnameList in older torch headers)
  return {dtokens, dprompts.to(prompts.scalar_type()), dweight.reshape({B * M, 2, d}).sum(0).to(weight.scalar_type()),
          dsum.sum().to(bias_in.scalar_type()).reshape(bias_in.sizes())};
}

}  // namespace svpt
