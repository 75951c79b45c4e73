// ae_update on CUDA, in place on the k selected patch rows of h (svpt/ops.py). at::topk picks the
// rows from the small [B, N] saliency; then one kernel, a block per (sample, column chunk): the
// mean of the M prompt rows (kept for backward) and u = scale * mean added to the k selected
// rows. The backward: per (sample, column chunk), dL/du = the sum of the gradient over the selected
// rows, its dot product with the mean (one partial per block, summed by ATen: deterministic), and
// scale / M * dL/du added to the gradient's prompt rows in place. No other row is touched; scale
// stays on the device (no host sync).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/topk.h>

#include "../svpt.h"
#include "cuda_utils.cuh"

namespace svpt {
namespace {

using namespace cuda_utils;

constexpr int kThreads = 256;  // columns per block

// h (strides sb, st; unit stride along d) with its prompt rows and the selected rows.
struct Layout {
  int64_t sb, st;
  int num_prefix, num_prompts, first_patch, k;
};

Layout layout_of(const at::Tensor& t, const at::Tensor& index, int64_t num_prefix, int64_t num_prompts) {
  return {t.stride(0), t.stride(1), static_cast<int>(num_prefix), static_cast<int>(num_prompts),
          static_cast<int>(num_prefix + num_prompts), static_cast<int>(index.size(1))};
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) ae_fwd_kernel(scalar_t* __restrict__ h, const int64_t* __restrict__ index,
                                                          const acc_t* __restrict__ scale, acc_t* __restrict__ mean,
                                                          Layout lay, int d) {
  const int64_t b = blockIdx.y;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  scalar_t* base = h + b * lay.sb + c;
  acc_t s = 0;
  for (int m = 0; m < lay.num_prompts; ++m) s += static_cast<acc_t>(base[(lay.num_prefix + m) * lay.st]);
  const acc_t mu = s / acc_t(lay.num_prompts);
  mean[b * d + c] = mu;
  const acc_t u = scale[0] * mu;
  // The selected rows are patch rows: disjoint from the prompt rows read above.
  for (int j = 0; j < lay.k; ++j) {
    scalar_t* x = base + (lay.first_patch + index[b * lay.k + j]) * lay.st;
    *x = static_cast<scalar_t>(static_cast<acc_t>(*x) + u);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) ae_bwd_kernel(scalar_t* __restrict__ grad,
                                                          const int64_t* __restrict__ index,
                                                          const acc_t* __restrict__ scale,
                                                          const acc_t* __restrict__ mean, acc_t* __restrict__ part,
                                                          Layout lay, int d) {
  __shared__ acc_t scratch[32];
  const int64_t b = blockIdx.y;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const bool valid = c < d;  // no early return: every thread joins the block sum
  scalar_t* base = grad + b * lay.sb + (valid ? c : 0);
  acc_t du = 0;
  if (valid) {
    for (int j = 0; j < lay.k; ++j) du += static_cast<acc_t>(base[(lay.first_patch + index[b * lay.k + j]) * lay.st]);
  }
  const acc_t dot = block_sum(valid ? du * mean[b * d + c] : acc_t(0), scratch);
  if (threadIdx.x == 0) part[b * gridDim.x + blockIdx.x] = dot;
  if (!valid) return;
  const acc_t f = scale[0] / acc_t(lay.num_prompts) * du;
  for (int m = 0; m < lay.num_prompts; ++m) {
    scalar_t* g = base + (lay.num_prefix + m) * lay.st;
    *g = static_cast<scalar_t>(static_cast<acc_t>(*g) + f);
  }
}

dim3 grid_of(int64_t batch, int64_t d) {
  return dim3(static_cast<unsigned int>((d + kThreads - 1) / kThreads), static_cast<unsigned int>(batch));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ae_update_fwd_cuda(at::Tensor& h, const at::Tensor& saliency,
                                                      const at::Tensor& scale, int64_t num_prefix,
                                                      int64_t num_prompts, int64_t k) {
  check_ae_update(h, saliency, scale, num_prefix, num_prompts, k);
  const BelowAutograd below;
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor index = std::get<1>(at::topk(saliency, k, -1)).contiguous();
  const int64_t B = h.size(0), d = h.size(2);
  const auto acc = at::toAccumulateType(h.scalar_type(), /*is_cuda=*/true);
  at::Tensor mean = at::empty({B, d}, h.options().dtype(acc));
  if (mean.numel() == 0) return {mean, index};
  const at::Tensor s = scale.to(h.device(), acc).reshape({1});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "svpt_ae_update_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    ae_fwd_kernel<scalar_t, acc_t><<<grid_of(B, d), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        h.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), s.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
        layout_of(h, index, num_prefix, num_prompts), static_cast<int>(d));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, index};
}

at::Tensor ae_update_bwd_cuda(at::Tensor& grad, const at::Tensor& mean, const at::Tensor& index,
                              const at::Tensor& scale, int64_t num_prefix, int64_t num_prompts) {
  check_ae_update_bwd(grad, mean, index, scale, num_prefix, num_prompts);
  const BelowAutograd below;
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t B = grad.size(0), d = grad.size(2);
  const auto acc = at::toAccumulateType(grad.scalar_type(), /*is_cuda=*/true);
  TORCH_CHECK(mean.scalar_type() == acc, "svpt ae_update backward: mean must be in the accumulation dtype");
  const dim3 grid = grid_of(B, d);
  at::Tensor part = at::zeros({B, static_cast<int64_t>(grid.x)}, grad.options().dtype(acc));
  if (B > 0 && d > 0) {
    const at::Tensor s = scale.to(grad.device(), acc).reshape({1});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "svpt_ae_update_bwd_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      ae_bwd_kernel<scalar_t, acc_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), s.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
          part.data_ptr<acc_t>(), layout_of(grad, index, num_prefix, num_prompts), static_cast<int>(d));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return part.sum().to(scale.scalar_type()).reshape(scale.sizes());
}

}  // namespace svpt
