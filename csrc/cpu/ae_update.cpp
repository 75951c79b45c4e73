// ae_update on CPU: the residual add h = tokens + attn_out and AE's additive update of the
// top-k salient patch rows, h[idx] += scale * mean(prompt rows of h), in one pass over the
// tokens. The top-k itself is at::topk on the small [B, N] saliency.
#include <ATen/Parallel.h>

#include <vector>

#include "../svpt.h"

namespace svpt {
namespace cpu {

template <typename T>
static void ae_fwd_kernel(const T* tok, const T* att, const int64_t* rows, T scale, T* out, T* mean, int64_t B,
                          int64_t T_, int64_t d, int64_t np, int64_t M, int64_t k) {
  // Mean of the prompt rows of h, per sample.
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* mb = mean + b * d;
      std::fill(mb, mb + d, T(0));
      for (int64_t m = 0; m < M; ++m) {
        const int64_t off = (b * T_ + np + m) * d;
        for (int64_t c = 0; c < d; ++c) mb[c] += tok[off + c] + att[off + c];
      }
      for (int64_t c = 0; c < d; ++c) mb[c] /= T(M);
    }
  });
  std::vector<uint8_t> hit(B * T_, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < k; ++j) hit[b * T_ + rows[b * k + j]] = 1;
  at::parallel_for(0, B * T_, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* a = tok + r * d;
      const T* e = att + r * d;
      T* o = out + r * d;
      if (hit[r]) {
        const T* mb = mean + (r / T_) * d;
        for (int64_t c = 0; c < d; ++c) o[c] = a[c] + e[c] + scale * mb[c];
      } else {
        for (int64_t c = 0; c < d; ++c) o[c] = a[c] + e[c];
      }
    }
  });
}

template <typename T>
static void ae_bwd_kernel(const T* grad, const int64_t* rows, const T* mean, T scale, T* dh, T* du_dot_mean, int64_t B,
                          int64_t T_, int64_t d, int64_t np, int64_t M, int64_t k) {
  // du[b] = sum of grad over the updated rows; it flows to scale (du . mean) and, through
  // the mean, to every prompt row of h (scale * du / M).
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> du(d);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(du.begin(), du.end(), T(0));
      for (int64_t j = 0; j < k; ++j) {
        const T* g = grad + (b * T_ + rows[b * k + j]) * d;
        for (int64_t c = 0; c < d; ++c) du[c] += g[c];
      }
      T acc = 0;
#pragma omp simd reduction(+ : acc)  // -fopenmp: lets the float reduction vectorise
      for (int64_t c = 0; c < d; ++c) acc += du[c] * mean[b * d + c];
      du_dot_mean[b] = acc;
      for (int64_t t = 0; t < T_; ++t) {
        const T* g = grad + (b * T_ + t) * d;
        T* o = dh + (b * T_ + t) * d;
        if (t >= np && t < np + M) {
          const T f = scale / T(M);
          for (int64_t c = 0; c < d; ++c) o[c] = g[c] + f * du[c];
        } else {
          std::copy(g, g + d, o);
        }
      }
    }
  });
}

}  // namespace cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor> ae_update_fwd_cpu(const at::Tensor& tokens_in,
                                                                 const at::Tensor& attn_in,
                                                                 const at::Tensor& saliency, const at::Tensor& scale,
                                                                 int64_t num_prefix, int64_t num_prompts, int64_t k) {
  check_ae_update(tokens_in, attn_in, saliency, num_prefix, num_prompts, k);
  const at::Tensor tokens = tokens_in.contiguous(), attn = attn_in.to(tokens.scalar_type()).contiguous();
  const int64_t B = tokens.size(0), T_ = tokens.size(1), d = tokens.size(2);
  const at::Tensor rows = (std::get<1>(saliency.topk(k, -1)) + (num_prefix + num_prompts)).contiguous();
  at::Tensor out = at::empty_like(tokens);
  at::Tensor mean = at::empty({B, d}, tokens.options());
  AT_DISPATCH_FLOATING_TYPES(tokens.scalar_type(), "svpt_ae_update_fwd_cpu", [&] {
    cpu::ae_fwd_kernel<scalar_t>(tokens.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(),
                                 scale.item<scalar_t>(), out.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), B, T_, d,
                                 num_prefix, num_prompts, k);
  });
  return {out, rows, mean};
}

std::tuple<at::Tensor, at::Tensor> ae_update_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& rows,
                                                     const at::Tensor& mean, const at::Tensor& scale,
                                                     int64_t num_prefix, int64_t num_prompts) {
  const at::Tensor grad = grad_in.to(mean.scalar_type()).contiguous();
  const int64_t B = grad.size(0), T_ = grad.size(1), d = grad.size(2), k = rows.size(1);
  at::Tensor dh = at::empty_like(grad);
  at::Tensor partial = at::empty({B}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "svpt_ae_update_bwd_cpu", [&] {
    cpu::ae_bwd_kernel<scalar_t>(grad.data_ptr<scalar_t>(), rows.contiguous().data_ptr<int64_t>(),
                                 mean.data_ptr<scalar_t>(), scale.item<scalar_t>(), dh.data_ptr<scalar_t>(),
                                 partial.data_ptr<scalar_t>(), B, T_, d, num_prefix, num_prompts, k);
  });
  return {dh, partial.sum().reshape(scale.sizes())};
}

}  // namespace svpt
