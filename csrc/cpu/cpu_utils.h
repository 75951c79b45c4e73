// CPU helpers: a row-major GEMM on raw pointers (the BLAS torch links, or at::addmm),
// an exp that the compiler can vectorise, and the row softmax the kernels share.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

// Hot loops get AVX-512 / AVX2 clones picked at load time, so one build runs fast on any
// x86-64 without -march=native (which would break wheels built on another machine).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
// Feature names, not arch= names: GCC dispatches arch= clones on the CPU model, so an AMD
// CPU with AVX-512 would get the default clone.
#define SVPT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SVPT_MULTIVERSION
#endif

// Fortran BLAS entry points. torch's CPU library exports them when it links MKL or
// OpenBLAS; declared weak so that a torch without them still loads this extension and
// falls back to the loop below.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace svpt {
namespace cpu {

// Fortran BLAS only when torch links MKL (LP64 interface, as torch builds it); any other
// torch (e.g. OpenBLAS builds, whose integer width we cannot check) goes through at::mm.
// SVPT_CPP_BLAS=0 forces the at::mm path (read once; the tests use it to check that path).
inline bool have_blas() {
  static const bool ok = sgemm_ != nullptr && dgemm_ != nullptr && at::globalContext().hasMKL() &&
                         !(std::getenv("SVPT_CPP_BLAS") && std::string(std::getenv("SVPT_CPP_BLAS")) == "0");
  return ok;
}

// C[m, n] = alpha * op(A) op(B) + beta * C, all row-major with leading dims lda/ldb/ldc;
// op(A) is [m, k] (A stored [k, m] when ta), op(B) is [k, n] (B stored [n, k] when tb).
template <typename T>
void gemm_aten(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  C.addmm_(view(a, m, k, lda, ta), view(b, k, n, ldb, tb), beta, alpha);  // beta == 0 ignores C's contents
}

// Row-major C = A B is column-major C^T = B^T A^T: swap the operands for Fortran BLAS.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (!have_blas()) return gemm_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LDA = int(ldb), LDB = int(lda), LDC = int(ldc);
  sgemm_(&tA, &tB, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                 const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (!have_blas()) return gemm_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LDA = int(ldb), LDB = int(lda), LDC = int(ldc);
  dgemm_(&tA, &tB, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

// exp(x) for float without a libm call, so loops over it vectorise (Cephes expf: range
// reduction by ln 2, degree-6 polynomial; ~1 ulp). Rounding to the nearest integer uses the
// 1.5 * 2^23 trick instead of floor (no call, no branch). Inputs below -87 give ~1e-38,
// not 0, which is below anything that matters after normalisation by a sum >= 1.
// always_inline: it must be inlined into the multiversioned loops for them to vectorise.
__attribute__((always_inline)) inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x -= fx * 0.693359375f;
  x -= fx * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
// Eight lanes of fast_exp with GCC vector extensions: compiled inside a SVPT_MULTIVERSION
// function this is AVX-512 / AVX2 code, in the default clone two SSE halves. (Auto-
// vectorisation of the scalar loop is not reliable across clones.)
#pragma GCC diagnostic ignored "-Wpsabi"  // v8f only crosses always_inline calls: no ABI involved
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

__attribute__((always_inline)) inline v8f fast_exp8(v8f x) {
  const v8f lo = v8f{} - 87.0f, hi = v8f{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v8f fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x -= fx * 0.693359375f;
  x -= fx * -2.12194440e-4f;
  v8f y = v8f{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  const v8i bits = (__builtin_convertvector(fx, v8i) + 127) << 23;
  return y * (v8f)bits;  // vector-extension cast: reinterprets the lanes
}

// s[j] <- exp(s[j] - shift) for j < n; returns the sum of the new values.
__attribute__((always_inline)) inline float exp_shifted_inplace(float* s, int64_t n, float shift) {
  v8f acc = v8f{};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    v8f x;
    std::memcpy(&x, s + j, sizeof(x));
    x = fast_exp8(x - shift);
    std::memcpy(s + j, &x, sizeof(x));
    acc += x;
  }
  float sum = 0.f;
  for (int k = 0; k < 8; ++k) sum += acc[k];
  for (; j < n; ++j) {
    s[j] = fast_exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

inline double fast_exp(double x) { return std::exp(x); }  // float64 is for checking, not speed

// BLAS wants unit stride along D and a row stride of at least D ([B, T, H, D] tensors, e.g. views
// of a qkv projection); anything else is copied.
inline at::Tensor gemm_ready(const at::Tensor& t) {
  if (t.stride(3) == 1 && t.stride(1) >= t.size(3) && t.stride(1) > 0) return t;
  return t.contiguous();
}

// Row softmax and its backward (softmax.cpp), float32 vectorised, float64 plain.
// softmax_row: s <- softmax(s), returns the log-sum-exp.
// dsoftmax_row: s <- p = exp(s - lse); dp <- ds = p * (dp - sum_j p_j dp_j).
// softmax_grad_row: the same ds from the probabilities p themselves.
float softmax_row_f32(float* s, int64_t n);
double softmax_row(double* s, int64_t n);
void dsoftmax_row_f32(float* s, float* dp, int64_t n, float lse);
void dsoftmax_row(double* s, double* dp, int64_t n, double lse);
void softmax_grad_row_f32(const float* p, float* dp, int64_t n);
void softmax_grad_row(const double* p, double* dp, int64_t n);
inline float softmax_row(float* s, int64_t n) { return softmax_row_f32(s, n); }
inline void dsoftmax_row(float* s, float* dp, int64_t n, float lse) { dsoftmax_row_f32(s, dp, n, lse); }
inline void softmax_grad_row(const float* p, float* dp, int64_t n) { softmax_grad_row_f32(p, dp, n); }

}  // namespace cpu
}  // namespace svpt
