// folded_cross_attention on CUDA: the products are cuBLAS GEMMs through ATen (addmm / mm, in the
// inputs' dtype, as eager's F.linear runs them), and one small kernel does the per-head softmax
// over the M columns of each head (forward) or recomputes it and forms the softmax backward
// (backward). Nothing is saved in forward besides the inputs; the backward recomputes the logits.
// The weight gradients are single GEMMs / reductions over all rows (deterministic, no atomics).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <limits>

#include "../svpt.h"
#include "cuda_utils.cuh"

namespace svpt {
namespace {

using namespace cuda_utils;

constexpr int kWarps = 4;

// One warp per (row, head): s[row, h*M : (h+1)*M] <- p = softmax of those logits; with dp,
// also dp <- ds = p * (dp - sum_j p_j dp_j) over the same columns. Any M (lanes stride over it).
template <typename scalar_t, typename acc_t, bool BACKWARD>
__global__ void __launch_bounds__(kWarps * 32) head_softmax_kernel(scalar_t* __restrict__ s,
                                                                   scalar_t* __restrict__ dp, int64_t groups, int M) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (group >= groups) return;  // whole warps leave together: the shuffles below stay full
  const int lane = threadIdx.x % 32;
  scalar_t* sg = s + group * M;  // a head's M columns of a row are contiguous in [R, H*M]
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int j = lane; j < M; j += 32) mx = max(mx, static_cast<acc_t>(sg[j]));
  mx = warp_max(mx);
  acc_t sum = 0;
  for (int j = lane; j < M; j += 32) sum += exp_acc(static_cast<acc_t>(sg[j]) - mx);
  const acc_t inv = acc_t(1) / warp_sum(sum);
  if (!BACKWARD) {
    for (int j = lane; j < M; j += 32) sg[j] = static_cast<scalar_t>(exp_acc(static_cast<acc_t>(sg[j]) - mx) * inv);
    return;
  }
  scalar_t* dg = dp + group * M;
  acc_t di = 0;
  for (int j = lane; j < M; j += 32) di += exp_acc(static_cast<acc_t>(sg[j]) - mx) * inv * static_cast<acc_t>(dg[j]);
  di = warp_sum(di);
  for (int j = lane; j < M; j += 32) {
    const acc_t p = exp_acc(static_cast<acc_t>(sg[j]) - mx) * inv;
    sg[j] = static_cast<scalar_t>(p);
    dg[j] = static_cast<scalar_t>(p * (static_cast<acc_t>(dg[j]) - di));
  }
}

// logits [R, H*M] -> probabilities in place; with dp [R, H*M]: dp -> the logits' gradient.
void head_softmax(at::Tensor& logits, at::Tensor* dp, int64_t M) {
  const int64_t groups = logits.numel() / M;
  if (groups == 0) return;
  const unsigned int blocks = static_cast<unsigned int>((groups + kWarps - 1) / kWarps);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "svpt_head_softmax_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    if (dp) {
      head_softmax_kernel<scalar_t, acc_t, true><<<blocks, kWarps * 32, 0, stream>>>(
          logits.data_ptr<scalar_t>(), dp->data_ptr<scalar_t>(), groups, static_cast<int>(M));
    } else {
      head_softmax_kernel<scalar_t, acc_t, false><<<blocks, kWarps * 32, 0, stream>>>(
          logits.data_ptr<scalar_t>(), nullptr, groups, static_cast<int>(M));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// x Wl^T + b_logits, [R, H*M] contiguous.
at::Tensor logits_of(const at::Tensor& x, const at::Tensor& wl, const std::optional<at::Tensor>& bl) {
  return bl ? at::addmm(bl->reshape({-1}), x, wl.t()) : at::mm(x, wl.t());
}

}  // namespace

at::Tensor folded_cross_attention_fwd_cuda(const at::Tensor& x, const at::Tensor& w_logits,
                                           const std::optional<at::Tensor>& b_logits, const at::Tensor& w_values,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& residual, bool add_x) {
  check_folded(x, w_logits, b_logits, w_values);
  const c10::cuda::CUDAGuard guard(x.device());
  const BelowAutograd below;  // the inputs already have the products' dtype: autocast must not cast them
  const int64_t M = w_logits.size(1), d = x.size(1);
  const at::Tensor wl = w_logits.reshape({-1, d}), wv = w_values.reshape({-1, d});
  at::Tensor p = logits_of(x, wl, b_logits);
  head_softmax(p, nullptr, M);
  const at::Tensor ca = bias ? at::addmm(*bias, p, wv) : at::mm(p, wv);
  const at::Tensor res = add_x ? x : (residual ? *residual : at::Tensor());
  return res.defined() ? res + ca : ca;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> folded_cross_attention_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w_logits,
    const std::optional<at::Tensor>& b_logits, const at::Tensor& w_values, bool bias_grad, bool add_x) {
  check_folded(x, w_logits, b_logits, w_values);
  const c10::cuda::CUDAGuard guard(x.device());
  const BelowAutograd below;
  const int64_t H = w_logits.size(0), M = w_logits.size(1), d = x.size(1);
  const at::Tensor wl = w_logits.reshape({-1, d}), wv = w_values.reshape({-1, d});
  const at::Tensor g = grad.to(x.scalar_type());
  at::Tensor p = logits_of(x, wl, b_logits);  // recomputed, then p in place
  at::Tensor ds = at::mm(g, wv.t());          // dP, then dS in place
  head_softmax(p, &ds, M);
  at::Tensor dx = add_x ? at::addmm(g, ds, wl) : at::mm(ds, wl);
  at::Tensor dwl = at::mm(ds.t(), x).view(w_logits.sizes());
  at::Tensor dwv = at::mm(p.t(), g).view(w_values.sizes());
  const auto acc = at::toAccumulateType(x.scalar_type(), /*is_cuda=*/true);  // sums over all rows in float
  at::Tensor dbl = b_logits ? ds.sum(0, false, acc).view({H, M}).to(x.scalar_type()) : at::empty({0}, x.options());
  at::Tensor dbias = bias_grad ? grad.sum(0, false, acc).to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dwl, dbl, dwv, dbias};
}

}  // namespace svpt
