// Row softmax and its backward for the CPU kernels (attention rows, the folded cross-attention's
// per-head groups). Defined once here: the multiversioned clones are built in one place.
#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu_utils.h"

namespace svpt {
namespace cpu {

namespace {
// dp <- p * (dp - sum_j p_j dp_j). The row term taken from the same p and dp (as eager's
// softmax backward does) cancels exactly where it should, e.g. a single key gives ds = 0.
template <typename T>
__attribute__((always_inline)) inline void softmax_grad_inplace(const T* p, T* dp, int64_t n) {
  T di = 0;
#pragma omp simd reduction(+ : di)  // -fopenmp: lets the compiler reorder the float reduction
  for (int64_t j = 0; j < n; ++j) di += p[j] * dp[j];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - di);
}
}  // namespace

SVPT_MULTIVERSION float softmax_row_f32(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  const float sum = exp_shifted_inplace(s, n, m);
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  return m + std::log(sum);
}

double softmax_row(double* s, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  double sum = 0.;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  const double inv = 1. / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  return m + std::log(sum);
}

SVPT_MULTIVERSION void dsoftmax_row_f32(float* s, float* dp, int64_t n, float lse) {
  exp_shifted_inplace(s, n, lse);
  softmax_grad_inplace(s, dp, n);
}

void dsoftmax_row(double* s, double* dp, int64_t n, double lse) {
  for (int64_t j = 0; j < n; ++j) s[j] = std::exp(s[j] - lse);
  softmax_grad_inplace(s, dp, n);
}

SVPT_MULTIVERSION void softmax_grad_row_f32(const float* p, float* dp, int64_t n) { softmax_grad_inplace(p, dp, n); }

void softmax_grad_row(const double* p, double* dp, int64_t n) { softmax_grad_inplace(p, dp, n); }

}  // namespace cpu
}  // namespace svpt
