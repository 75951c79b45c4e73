// CUDA helpers shared by the kernels: warp / block reductions and exp in the accumulation
// type (float for float/half/bfloat16 inputs, double for double).
#pragma once

// c10's CUDA headers only: ATen/cuda/CUDAContext.h would also need the cuSPARSE/cuBLAS
// headers, which a bare nvcc install (CI) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <limits>

namespace svpt {
namespace cuda_utils {

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// warp_reduce over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the result. `scratch` holds 32 values; the trailing barrier lets the caller reuse it at once.
template <typename T, typename WarpReduce>
__device__ __forceinline__ T block_reduce(T x, T* scratch, WarpReduce warp_reduce, T identity) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = warp_reduce(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  T total = warp_reduce(lane < warps ? scratch[lane] : identity);
  __syncthreads();
  return total;
}

template <typename T>
__device__ __forceinline__ T block_sum(T x, T* scratch) {
  return block_reduce(x, scratch, [](T v) { return warp_sum(v); }, T(0));
}

template <typename T>
__device__ __forceinline__ T block_max(T x, T* scratch) {
  return block_reduce(x, scratch, [](T v) { return warp_max(v); }, -std::numeric_limits<T>::infinity());
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

struct Strides {  // element strides of a [B, T, H, D] tensor whose D is contiguous
  int64_t b, t, h;
};

inline Strides strides_of(const at::Tensor& t, bool bcast_batch) {
  return {bcast_batch ? 0 : t.stride(0), t.stride(1), t.stride(2)};
}

// Dynamic shared memory past the default 48 KiB needs the kernel's opt-in.
template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

}  // namespace cuda_utils
}  // namespace svpt
