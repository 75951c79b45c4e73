// da_mix on CPU, in place on the M prompt rows (svpt/ops.py): the forward reads each prompt row
// P_out and the prompts P, keeps P_out [B, M, d] for backward and writes g * P_out + (1 - g) * P,
// g = sigmoid(P_out . w0 + P . w1 + b); no other row is read or written. The backward recomputes g
// and rewrites the prompt rows of the incoming gradient only. Half types are read and written as
// they are and computed in float32.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../svpt.h"

namespace svpt {
namespace cpu {
namespace {

// Rows per parallel task: ~32k elements, so the small ViT shapes run on one thread without the
// cost of waking the others.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)); }

// Where row (b, m) of the prompts and of a [B, T, d] buffer start (element offsets).
struct Rows {
  int64_t buf_b, buf_t, num_prefix, prompt_b, prompt_m, M;
  int64_t buffer(int64_t r) const { return (r / M) * buf_b + (num_prefix + r % M) * buf_t; }
  int64_t prompt(int64_t r) const { return (r / M) * prompt_b + (r % M) * prompt_m; }
};

Rows rows_of(const at::Tensor& buffer, const at::Tensor& prompts, int64_t num_prefix) {
  return {buffer.stride(0), buffer.stride(1), num_prefix, prompts.size(0) == 1 ? 0 : prompts.stride(0),
          prompts.stride(1), prompts.size(1)};
}

template <typename scalar_t, typename acc_t>
acc_t gate_of(const scalar_t* x, const scalar_t* p, const acc_t* w, acc_t bias, int64_t d) {
  acc_t s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0, s1)  // -fopenmp: lets the float reductions vectorise
  for (int64_t c = 0; c < d; ++c) {
    s0 += static_cast<acc_t>(x[c]) * w[c];
    s1 += static_cast<acc_t>(p[c]) * w[d + c];
  }
  return acc_t(1) / (acc_t(1) + std::exp(-(s0 + s1 + bias)));  // bias = -inf gives 0: the rows become P
}

template <typename scalar_t, typename acc_t>
void forward(scalar_t* tok, const scalar_t* pr, const acc_t* w, acc_t bias, scalar_t* prev, const Rows& rows_at,
             int64_t rows, int64_t d) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* x = tok + rows_at.buffer(r);
      const scalar_t* p = pr + rows_at.prompt(r);
      std::copy(x, x + d, prev + r * d);
      const acc_t g = gate_of(x, p, w, bias, d);
      for (int64_t c = 0; c < d; ++c) {
        x[c] = static_cast<scalar_t>(g * static_cast<acc_t>(x[c]) + (acc_t(1) - g) * static_cast<acc_t>(p[c]));
      }
    }
  });
}

// Row pass of the backward: grad's prompt rows <- dL/dP_out, dprompt_rows [rows, d] <- dL/dP per
// row and dlogit [rows] <- dL/d(gate logit).
template <typename scalar_t, typename acc_t>
void backward_rows(scalar_t* grad, const scalar_t* prev, const scalar_t* pr, const acc_t* w, acc_t bias,
                   acc_t* dprompt_rows, acc_t* dlogit, const Rows& rows_at, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* go = grad + rows_at.buffer(r);
      const scalar_t* x = prev + r * d;
      const scalar_t* p = pr + rows_at.prompt(r);
      const acc_t g = gate_of(x, p, w, bias, d);
      acc_t dg = 0;
#pragma omp simd reduction(+ : dg)
      for (int64_t c = 0; c < d; ++c) {
        dg += static_cast<acc_t>(go[c]) * (static_cast<acc_t>(x[c]) - static_cast<acc_t>(p[c]));
      }
      const acc_t ds = dg * g * (acc_t(1) - g);
      acc_t* dp = dprompt_rows + r * d;
      for (int64_t c = 0; c < d; ++c) {
        const acc_t gc = static_cast<acc_t>(go[c]);
        dp[c] = (acc_t(1) - g) * gc + ds * w[d + c];
        go[c] = static_cast<scalar_t>(g * gc + ds * w[c]);
      }
      dlogit[r] = ds;
    }
  });
}

// dw [2, d] <- (sum_r dlogit[r] prev[r], sum_r dlogit[r] P[r]) and, for broadcast prompts,
// dprompts [M, d] <- sum over the batch of dprompt_rows. Parallel over columns, rows summed in a
// fixed order: the same result for any thread count.
template <typename scalar_t, typename acc_t>
void backward_reduce(const scalar_t* prev, const scalar_t* pr, const acc_t* dlogit, const acc_t* dprompt_rows,
                     acc_t* dw, acc_t* dprompts_bcast, const Rows& rows_at, int64_t rows, int64_t d) {
  at::parallel_for(0, d, std::max<int64_t>(1, 262144 / std::max<int64_t>(rows, 1)), [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> a0(c1 - c0, acc_t(0)), a1(c1 - c0, acc_t(0));
    if (dprompts_bcast) {
      for (int64_t m = 0; m < rows_at.M; ++m) {
        std::fill(dprompts_bcast + m * d + c0, dprompts_bcast + m * d + c1, acc_t(0));
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t ds = dlogit[r];
      const scalar_t* x = prev + r * d;
      const scalar_t* p = pr + rows_at.prompt(r);
      for (int64_t c = c0; c < c1; ++c) {
        a0[c - c0] += ds * static_cast<acc_t>(x[c]);
        a1[c - c0] += ds * static_cast<acc_t>(p[c]);
      }
      if (dprompts_bcast) {
        acc_t* dst = dprompts_bcast + (r % rows_at.M) * d;
        const acc_t* src = dprompt_rows + r * d;
        for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      dw[c] = a0[c - c0];
      dw[d + c] = a1[c - c0];
    }
  });
}

}  // namespace
}  // namespace cpu

at::Tensor da_mix_fwd_cpu(at::Tensor& tokens, const at::Tensor& prompts_in, const at::Tensor& weight,
                          const at::Tensor& bias, int64_t num_prefix) {
  check_da_mix(tokens, prompts_in, weight, bias, num_prefix);
  const BelowAutograd below;
  const at::Tensor prompts = prompts_in.stride(2) == 1 ? prompts_in : prompts_in.contiguous();
  const int64_t B = tokens.size(0), d = tokens.size(2), M = prompts.size(1);
  at::Tensor prev = at::empty({B, M, d}, tokens.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "svpt_da_mix_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = weight.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    cpu::forward<scalar_t, acc_t>(tokens.data_ptr<scalar_t>(), prompts.data_ptr<scalar_t>(), w.data_ptr<acc_t>(),
                                  bias.item<acc_t>(), prev.data_ptr<scalar_t>(),
                                  cpu::rows_of(tokens, prompts, num_prefix), B * M, d);
  });
  return prev;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> da_mix_bwd_cpu(at::Tensor& grad, const at::Tensor& prev_in,
                                                              const at::Tensor& prompts_in, const at::Tensor& weight,
                                                              const at::Tensor& bias, int64_t num_prefix) {
  check_da_mix_bwd(grad, prev_in, prompts_in, weight, bias, num_prefix);
  const BelowAutograd below;
  const at::Tensor prev = prev_in.contiguous();
  const at::Tensor prompts = prompts_in.stride(2) == 1 ? prompts_in : prompts_in.contiguous();
  const int64_t B = grad.size(0), d = grad.size(2), M = prompts.size(1), rows = B * M;
  const bool bcast = prompts.size(0) == 1;
  at::Tensor grad_prompts, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "svpt_da_mix_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor w = weight.to(acc).contiguous();
    const auto opts = grad.options().dtype(acc);
    at::Tensor dprompt_rows = at::empty({B, M, d}, opts), dlogit = at::empty({rows}, opts);
    at::Tensor dw = at::empty({2, d}, opts);
    at::Tensor dprompts_bcast = bcast ? at::empty({1, M, d}, opts) : at::Tensor();
    const cpu::Rows rows_at = cpu::rows_of(grad, prompts, num_prefix);
    cpu::backward_rows<scalar_t, acc_t>(grad.data_ptr<scalar_t>(), prev.data_ptr<scalar_t>(),
                                        prompts.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), bias.item<acc_t>(),
                                        dprompt_rows.data_ptr<acc_t>(), dlogit.data_ptr<acc_t>(), rows_at, rows, d);
    cpu::backward_reduce<scalar_t, acc_t>(prev.data_ptr<scalar_t>(), prompts.data_ptr<scalar_t>(),
                                          dlogit.data_ptr<acc_t>(), dprompt_rows.data_ptr<acc_t>(),
                                          dw.data_ptr<acc_t>(), bcast ? dprompts_bcast.data_ptr<acc_t>() : nullptr,
                                          rows_at, rows, d);
    grad_prompts = (bcast ? dprompts_bcast : dprompt_rows).to(prompts.scalar_type());
    grad_weight = dw.to(weight.scalar_type());
    // Summed in a fixed order (dlogit is small).
    acc_t total = 0;
    const acc_t* dl = dlogit.data_ptr<acc_t>();
    for (int64_t r = 0; r < rows; ++r) total += dl[r];
    grad_bias = at::empty(bias.sizes(), bias.options()).fill_(total);
  });
  return {grad_prompts, grad_weight, grad_bias};
}

}  // namespace svpt
