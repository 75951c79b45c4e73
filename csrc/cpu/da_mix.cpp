// da_mix on CPU: one pass over the tokens; the M prompt rows of each sample get the gate
// g = sigmoid(prev . w0 + P . w1 + b) and the mix g * prev + (1 - g) * P, every other row is
// copied. Backward recomputes g (two dot products per row) instead of saving it.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../svpt.h"

namespace svpt {
namespace cpu {

template <typename T>
static inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)  // -fopenmp: lets the float reduction vectorise
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

template <typename T>
static void da_mix_fwd_kernel(const T* tok, const T* pr, const T* w, T bias, T* out, int64_t B, int64_t T_,
                              int64_t d, int64_t M, int64_t np, bool p_bcast) {
  at::parallel_for(0, B * T_, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T_, t = r % T_;
      const T* src = tok + r * d;
      T* dst = out + r * d;
      if (t < np || t >= np + M) {
        std::copy(src, src + d, dst);
        continue;
      }
      const T* p = pr + ((p_bcast ? 0 : b) * M + (t - np)) * d;
      const T g = T(1) / (T(1) + std::exp(-(dot(src, w, d) + dot(p, w + d, d) + bias)));
      for (int64_t c = 0; c < d; ++c) dst[c] = g * src[c] + (T(1) - g) * p[c];
    }
  });
}

template <typename T>
static void da_mix_bwd_kernel(const T* grad, const T* tok, const T* pr, const T* w, T bias, T* dtok, T* dp_part,
                              T* dsum, int64_t B, int64_t T_, int64_t d, int64_t M, int64_t np, bool p_bcast) {
  // Row pass: dtokens, per-row dP (summed over the batch afterwards when P is broadcast) and
  // ds = dL/d(gate logit) per row.
  at::parallel_for(0, B * T_, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T_, t = r % T_;
      const T* g = grad + r * d;
      T* dst = dtok + r * d;
      if (t < np || t >= np + M) {
        std::copy(g, g + d, dst);
        continue;
      }
      const int64_t m = t - np;
      const T* prev = tok + r * d;
      const T* p = pr + ((p_bcast ? 0 : b) * M + m) * d;
      const T gate = T(1) / (T(1) + std::exp(-(dot(prev, w, d) + dot(p, w + d, d) + bias)));
      T dgate = 0;
#pragma omp simd reduction(+ : dgate)
      for (int64_t c = 0; c < d; ++c) dgate += g[c] * (prev[c] - p[c]);
      const T ds = dgate * gate * (T(1) - gate);
      T* dpr = dp_part + (b * M + m) * d;
      for (int64_t c = 0; c < d; ++c) {
        dst[c] = g[c] * gate + ds * w[c];
        dpr[c] = g[c] * (T(1) - gate) + ds * w[d + c];
      }
      dsum[b * M + m] = ds;
    }
  });
}

// dweight[0] = sum_rows ds * prev, dweight[1] = sum_rows ds * P: parallel over columns,
// rows summed in a fixed order (deterministic for any thread count).
template <typename T>
static void da_mix_weight_grad(const T* tok, const T* pr, const T* dsum, T* dw, int64_t B, int64_t T_, int64_t d,
                               int64_t M, int64_t np, bool p_bcast) {
  at::parallel_for(0, d, 64, [&](int64_t c0, int64_t c1) {
    std::vector<T> a0(c1 - c0, T(0)), a1(c1 - c0, T(0));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t m = 0; m < M; ++m) {
        const T ds = dsum[b * M + m];
        const T* prev = tok + (b * T_ + np + m) * d;
        const T* p = pr + ((p_bcast ? 0 : b) * M + m) * d;
        for (int64_t c = c0; c < c1; ++c) {
          a0[c - c0] += ds * prev[c];
          a1[c - c0] += ds * p[c];
        }
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      dw[c] = a0[c - c0];
      dw[d + c] = a1[c - c0];
    }
  });
}

}  // namespace cpu

at::Tensor da_mix_fwd_cpu(const at::Tensor& tokens_in, const at::Tensor& prompts_in, const at::Tensor& weight_in,
                          const at::Tensor& bias, int64_t num_prefix) {
  check_da_mix(tokens_in, prompts_in, weight_in, bias, num_prefix);
  const at::Tensor tokens = tokens_in.contiguous(), prompts = prompts_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor out = at::empty_like(tokens);
  const int64_t B = tokens.size(0), T_ = tokens.size(1), d = tokens.size(2), M = prompts.size(1);
  AT_DISPATCH_FLOATING_TYPES(tokens.scalar_type(), "svpt_da_mix_fwd_cpu", [&] {
    cpu::da_mix_fwd_kernel<scalar_t>(tokens.data_ptr<scalar_t>(), prompts.data_ptr<scalar_t>(),
                                     weight.data_ptr<scalar_t>(), bias.item<scalar_t>(), out.data_ptr<scalar_t>(), B,
                                     T_, d, M, num_prefix, prompts.size(0) == 1 && B > 1);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> da_mix_bwd_cpu(const at::Tensor& grad_in,
                                                                          const at::Tensor& tokens_in,
                                                                          const at::Tensor& prompts_in,
                                                                          const at::Tensor& weight_in,
                                                                          const at::Tensor& bias, int64_t num_prefix) {
  check_da_mix(tokens_in, prompts_in, weight_in, bias, num_prefix);
  const at::Tensor tokens = tokens_in.contiguous(), prompts = prompts_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad = grad_in.to(tokens.scalar_type()).contiguous();
  const int64_t B = tokens.size(0), T_ = tokens.size(1), d = tokens.size(2), M = prompts.size(1);
  const bool p_bcast = prompts.size(0) == 1 && B > 1;
  at::Tensor dtokens = at::empty_like(tokens);
  at::Tensor dprompts = at::empty({B, M, d}, tokens.options());
  at::Tensor dsum = at::empty({B, M}, tokens.options());
  at::Tensor dweight = at::empty({2, d}, tokens.options());
  AT_DISPATCH_FLOATING_TYPES(tokens.scalar_type(), "svpt_da_mix_bwd_cpu", [&] {
    cpu::da_mix_bwd_kernel<scalar_t>(grad.data_ptr<scalar_t>(), tokens.data_ptr<scalar_t>(),
                                     prompts.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.item<scalar_t>(),
                                     dtokens.data_ptr<scalar_t>(), dprompts.data_ptr<scalar_t>(),
                                     dsum.data_ptr<scalar_t>(), B, T_, d, M, num_prefix, p_bcast);
    cpu::da_mix_weight_grad<scalar_t>(tokens.data_ptr<scalar_t>(), prompts.data_ptr<scalar_t>(),
                                      dsum.data_ptr<scalar_t>(), dweight.data_ptr<scalar_t>(), B, T_, d, M, num_prefix,
                                      p_bcast);
  });
  if (prompts.size(0) == 1) dprompts = dprompts.sum(0, true);
  return {dtokens, dprompts, dweight, dsum.sum().reshape(bias.sizes())};
}

}  // namespace svpt
