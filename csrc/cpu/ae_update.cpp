// ae_update on CPU, in place on the k selected patch rows of h (svpt/ops.py). The forward reads
// the M prompt rows (their mean, kept for backward) and reads and writes the k rows that at::topk
// picks from the small [B, N] saliency; the backward reads the gradient at those k rows and adds
// the u path's share to the gradient's M prompt rows. No other row is touched.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/topk.h>

#include <algorithm>
#include <vector>

#include "../svpt.h"

namespace svpt {
namespace cpu {
namespace {

// Samples per parallel task: ~32k elements of work.
int64_t sample_grain(int64_t rows_per_sample, int64_t d) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(rows_per_sample * d, 1));
}

// h (strides sb, st; unit stride along d) with its prompt and selected rows.
template <typename scalar_t>
struct Buffer {
  scalar_t* base;
  int64_t sb, st, num_prefix, num_prompts, first_patch, k;
  const int64_t* index;  // [B, k], from the first patch row
  scalar_t* row(int64_t b, int64_t t) const { return base + b * sb + t * st; }
  scalar_t* selected(int64_t b, int64_t j) const { return row(b, first_patch + index[b * k + j]); }
};

template <typename scalar_t>
Buffer<scalar_t> buffer_of(at::Tensor& t, const at::Tensor& index, int64_t num_prefix, int64_t num_prompts) {
  return {t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), num_prefix, num_prompts, num_prefix + num_prompts,
          index.size(1), index.data_ptr<int64_t>()};
}

template <typename scalar_t, typename acc_t>
void forward(const Buffer<scalar_t>& h, acc_t scale, acc_t* mean, int64_t B, int64_t d) {
  at::parallel_for(0, B, sample_grain(h.num_prompts + h.k, d), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* mb = mean + b * d;
      std::fill(mb, mb + d, acc_t(0));
      for (int64_t m = 0; m < h.num_prompts; ++m) {
        const scalar_t* x = h.row(b, h.num_prefix + m);
        for (int64_t c = 0; c < d; ++c) mb[c] += static_cast<acc_t>(x[c]);
      }
      const acc_t inv = acc_t(1) / acc_t(h.num_prompts);
      for (int64_t c = 0; c < d; ++c) mb[c] *= inv;
      // The selected rows are patch rows: disjoint from the prompt rows read above.
      for (int64_t j = 0; j < h.k; ++j) {
        scalar_t* x = h.selected(b, j);
        for (int64_t c = 0; c < d; ++c) x[c] = static_cast<scalar_t>(static_cast<acc_t>(x[c]) + scale * mb[c]);
      }
    }
  });
}

// Returns sum_b du[b] . mean[b], du[b] = sum of grad over the selected rows of sample b, and adds
// scale / M * du[b] to the prompt rows of grad.
template <typename scalar_t, typename acc_t>
acc_t backward(const Buffer<scalar_t>& grad, const acc_t* mean, acc_t scale, int64_t B, int64_t d) {
  std::vector<acc_t> dscale(B);
  at::parallel_for(0, B, sample_grain(grad.num_prompts + grad.k, d), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> du(d);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(du.begin(), du.end(), acc_t(0));
      for (int64_t j = 0; j < grad.k; ++j) {
        const scalar_t* g = grad.selected(b, j);
        for (int64_t c = 0; c < d; ++c) du[c] += static_cast<acc_t>(g[c]);
      }
      acc_t dot = 0;
      const acc_t* mb = mean + b * d;
#pragma omp simd reduction(+ : dot)  // -fopenmp: lets the float reduction vectorise
      for (int64_t c = 0; c < d; ++c) dot += du[c] * mb[c];
      dscale[b] = dot;
      const acc_t f = scale / acc_t(grad.num_prompts);
      for (int64_t m = 0; m < grad.num_prompts; ++m) {
        scalar_t* g = grad.row(b, grad.num_prefix + m);
        for (int64_t c = 0; c < d; ++c) g[c] = static_cast<scalar_t>(static_cast<acc_t>(g[c]) + f * du[c]);
      }
    }
  });
  acc_t total = 0;  // in sample order: the same for any thread count
  for (int64_t b = 0; b < B; ++b) total += dscale[b];
  return total;
}

void check_index_values(const at::Tensor& index, int64_t num_patches) {
  const int64_t* p = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < num_patches, "svpt ae_update backward: index value ", p[i], " outside 0..",
                num_patches - 1);
  }
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> ae_update_fwd_cpu(at::Tensor& h, const at::Tensor& saliency,
                                                     const at::Tensor& scale, int64_t num_prefix, int64_t num_prompts,
                                                     int64_t k) {
  check_ae_update(h, saliency, scale, num_prefix, num_prompts, k);
  const BelowAutograd below;
  const at::Tensor index = std::get<1>(at::topk(saliency, k, -1)).contiguous();
  const int64_t B = h.size(0), d = h.size(2);
  at::Tensor mean;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "svpt_ae_update_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mean = at::empty({B, d}, h.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    cpu::forward<scalar_t, acc_t>(cpu::buffer_of<scalar_t>(h, index, num_prefix, num_prompts), scale.item<acc_t>(),
                                  mean.data_ptr<acc_t>(), B, d);
  });
  return {mean, index};
}

at::Tensor ae_update_bwd_cpu(at::Tensor& grad, const at::Tensor& mean, const at::Tensor& index,
                             const at::Tensor& scale, int64_t num_prefix, int64_t num_prompts) {
  check_ae_update_bwd(grad, mean, index, scale, num_prefix, num_prompts);
  cpu::check_index_values(index, grad.size(1) - num_prefix - num_prompts);
  const BelowAutograd below;
  const int64_t B = grad.size(0), d = grad.size(2);
  at::Tensor grad_scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "svpt_ae_update_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(mean.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "svpt ae_update backward: mean must be in the accumulation dtype of the gradient");
    const acc_t total = cpu::backward<scalar_t, acc_t>(cpu::buffer_of<scalar_t>(grad, index, num_prefix, num_prompts),
                                                       mean.data_ptr<acc_t>(), scale.item<acc_t>(), B, d);
    grad_scale = at::empty(scale.sizes(), scale.options()).fill_(total);
  });
  return grad_scale;
}

}  // namespace svpt
