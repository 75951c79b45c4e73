// attention_saliency on CPU: AE's saliency from the source query rows alone. Per (batch, head),
// the scores of those rows against all keys (one GEMM into a thread-local [rows, Tk] tile), their
// softmax, and the sum of the rows' probabilities over the saliency columns; the heads' partials
// [B, H, N] are then summed in head order (deterministic for any thread count). Half inputs are
// computed in float32.
#include <ATen/Parallel.h>

#include <vector>

#include "../svpt.h"
#include "cpu_utils.h"

namespace svpt {
namespace cpu {
namespace {

template <typename T>
void saliency(const at::Tensor& q, const at::Tensor& k, T scale, int64_t start, int64_t count, int64_t cols,
              float* out) {
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3), Tk = k.size(1), N = Tk - cols;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const int64_t qsb = q.stride(0), qst = q.stride(1), qsh = q.stride(2);
  const int64_t ksb = k.size(0) == 1 ? 0 : k.stride(0), kst = k.stride(1), ksh = k.stride(2);
  std::vector<T> part(B * H * N);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(count * Tk);  // thread-local tile
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      gemm(false, true, count, Tk, D, scale, qp + b * qsb + start * qst + h * qsh, qst, kp + b * ksb + h * ksh, kst,
           T(0), scores.data(), Tk);
      T* dst = part.data() + bh * N;
      std::fill(dst, dst + N, T(0));
      for (int64_t r = 0; r < count; ++r) {
        T* row = scores.data() + r * Tk;
        softmax_row(row, Tk);
        for (int64_t j = 0; j < N; ++j) dst[j] += row[cols + j];
      }
    }
  });
  const T inv = T(1) / T(H * count);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t j = 0; j < N; ++j) {
        T total = 0;
        for (int64_t h = 0; h < H; ++h) total += part[(b * H + h) * N + j];
        out[b * N + j] = static_cast<float>(total * inv);
      }
    }
  });
}

}  // namespace
}  // namespace cpu

at::Tensor attention_saliency_cpu(const at::Tensor& q_in, const at::Tensor& k_in, double scale, int64_t row_start,
                                  int64_t row_count, int64_t col_start) {
  check_saliency(q_in, k_in, row_start, row_count, col_start);
  const BelowAutograd below;
  // Half types in float32; only the source rows of q are converted.
  const bool half = q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16;
  const at::Tensor q = half ? q_in.narrow(1, row_start, row_count).to(at::kFloat) : q_in;
  const at::Tensor k = cpu::gemm_ready(half ? k_in.to(at::kFloat) : k_in);
  const int64_t start = half ? 0 : row_start;
  at::Tensor out = at::empty({q_in.size(0), k_in.size(1) - col_start}, q_in.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "svpt_attention_saliency_cpu", [&] {
    cpu::saliency<scalar_t>(cpu::gemm_ready(q), k, static_cast<scalar_t>(scale), start, row_count, col_start,
                            out.data_ptr<float>());
  });
  return out;
}

}  // namespace svpt
