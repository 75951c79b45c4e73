// ae_update on CUDA: the prompt-row mean of h = tokens + attn_out, at::topk on the small
// [B, N] saliency, then one elementwise pass writing h and a pass over the k selected rows
// writing tokens + attn_out + scale * mean (one rounding per element). Backward: the sum of
// the gradient over the selected rows (du), and one elementwise pass for dh.
// scale stays on the device (no .item(), so no host sync).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>

#include "../svpt.h"
#include "cuda_utils.cuh"

namespace svpt {
namespace {

using namespace cuda_utils;

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void prompt_mean_kernel(const scalar_t* __restrict__ tok, const scalar_t* __restrict__ att,
                                   acc_t* __restrict__ mean, int T, int d, int np, int M) {
  const int b = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  acc_t s = 0;
  for (int m = 0; m < M; ++m) {
    const int64_t at = (static_cast<int64_t>(b) * T + np + m) * d + c;
    s += static_cast<acc_t>(tok[at]) + static_cast<acc_t>(att[at]);
  }
  mean[static_cast<int64_t>(b) * d + c] = s / acc_t(M);
}

template <typename scalar_t, typename acc_t>
__global__ void residual_add_kernel(const scalar_t* __restrict__ tok, const scalar_t* __restrict__ att,
                                    scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(tok[i]) + static_cast<acc_t>(att[i]));
}

template <typename scalar_t, typename acc_t>
__global__ void enhance_rows_kernel(const scalar_t* __restrict__ tok, const scalar_t* __restrict__ att,
                                    const int64_t* __restrict__ rows, const acc_t* __restrict__ mean,
                                    const acc_t* __restrict__ scale, scalar_t* __restrict__ out, int T, int d, int k) {
  const int b = blockIdx.y, j = blockIdx.x;
  const int64_t base = (static_cast<int64_t>(b) * T + rows[static_cast<int64_t>(b) * k + j]) * d;
  const acc_t s = scale[0];
  for (int c = threadIdx.x; c < d; c += blockDim.x)
    out[base + c] = static_cast<scalar_t>(static_cast<acc_t>(tok[base + c]) + static_cast<acc_t>(att[base + c]) +
                                          s * mean[static_cast<int64_t>(b) * d + c]);
}

template <typename scalar_t, typename acc_t>
__global__ void selected_grad_sum_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ rows,
                                         acc_t* __restrict__ du, int T, int d, int k) {
  const int b = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  acc_t s = 0;
  for (int j = 0; j < k; ++j)
    s += static_cast<acc_t>(grad[(static_cast<int64_t>(b) * T + rows[static_cast<int64_t>(b) * k + j]) * d + c]);
  du[static_cast<int64_t>(b) * d + c] = s;
}

template <typename scalar_t, typename acc_t>
__global__ void dh_kernel(const scalar_t* __restrict__ grad, const acc_t* __restrict__ du,
                          const acc_t* __restrict__ scale, scalar_t* __restrict__ dh, int T, int d, int np, int M,
                          int64_t n) {
  const acc_t f = scale[0] / acc_t(M);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / d;
    const int t = row % T, c = i - row * d;
    acc_t g = static_cast<acc_t>(grad[i]);
    if (t >= np && t < np + M) g += f * du[(row / T) * d + c];
    dh[i] = static_cast<scalar_t>(g);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ae_update_fwd_cuda(const at::Tensor& tokens_in,
                                                                  const at::Tensor& attn_in,
                                                                  const at::Tensor& saliency, const at::Tensor& scale,
                                                                  int64_t num_prefix, int64_t num_prompts, int64_t k) {
  check_ae_update(tokens_in, attn_in, saliency, num_prefix, num_prompts, k);
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), attn = attn_in.to(tokens.scalar_type()).contiguous();
  const int64_t B = tokens.size(0), T = tokens.size(1), d = tokens.size(2);
  const auto acc_type = at::toAccumulateType(tokens.scalar_type(), /*is_cuda=*/true);
  const at::Tensor rows = (std::get<1>(saliency.topk(k, -1)) + (num_prefix + num_prompts)).contiguous();
  const at::Tensor scale_acc = scale.to(tokens.device(), acc_type).reshape({1}).contiguous();
  at::Tensor out = at::empty_like(tokens);
  at::Tensor mean = at::empty({B, d}, tokens.options().dtype(acc_type));
  if (out.numel() == 0) return {out, rows, mean};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "svpt_ae_update_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const dim3 mgrid((d + kThreads - 1) / kThreads, B);
    prompt_mean_kernel<scalar_t, acc_t><<<mgrid, kThreads, 0, stream>>>(
        tokens.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), T, d, num_prefix, num_prompts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t n = tokens.numel();
    residual_add_kernel<scalar_t, acc_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        tokens.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 rgrid(k, B);
    enhance_rows_kernel<scalar_t, acc_t><<<rgrid, kThreads, 0, stream>>>(
        tokens.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), mean.data_ptr<acc_t>(),
        scale_acc.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), T, d, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, rows, mean};
}

std::tuple<at::Tensor, at::Tensor> ae_update_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& rows_in,
                                                      const at::Tensor& mean, const at::Tensor& scale,
                                                      int64_t num_prefix, int64_t num_prompts) {
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous(), rows = rows_in.contiguous();
  const int64_t B = grad.size(0), T = grad.size(1), d = grad.size(2), k = rows.size(1);
  const auto acc_type = mean.scalar_type();
  const at::Tensor scale_acc = scale.to(grad.device(), acc_type).reshape({1}).contiguous();
  at::Tensor dh = at::empty_like(grad);
  at::Tensor du = at::zeros({B, d}, mean.options());
  if (grad.numel() > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "svpt_ae_update_bwd_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      TORCH_CHECK(mean.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "svpt ae_update: mean dtype");
      const dim3 sgrid((d + kThreads - 1) / kThreads, B);
      selected_grad_sum_kernel<scalar_t, acc_t><<<sgrid, kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), du.data_ptr<acc_t>(), T, d, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t n = grad.numel();
      dh_kernel<scalar_t, acc_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), du.data_ptr<acc_t>(), scale_acc.data_ptr<acc_t>(), dh.data_ptr<scalar_t>(), T, d,
          num_prefix, num_prompts, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // d scale = sum_b du[b] . mean[b]: a [B, d] reduction, left to ATen.
  at::Tensor dscale = (du * mean).sum().to(scale.scalar_type()).reshape(scale.sizes());
  return {dh, dscale};
}

}  // namespace svpt
