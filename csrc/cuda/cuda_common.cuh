// Device helpers shared by the kernels: scalar conversions and warp/block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace fca {
namespace cuda {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T>
__device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}
template <typename A>
__device__ __forceinline__ A warp_max(A x) {
  for (int off = 16; off > 0; off >>= 1) {
    const A y = __shfl_xor_sync(0xffffffffu, x, off);
    x = y > x ? y : x;
  }
  return x;
}

inline unsigned blocks_for(int64_t work, int threads) {
  const int64_t b = (work + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 2147483647 ? 2147483647 : b));
}

// Calls F<T>(...) with T the C++ type of dtype.
#define FCA_CUDA_DISPATCH(dtype, F, ...)                                  \
  switch (dtype) {                                                        \
    case DType::kFloat32: return F<float>(__VA_ARGS__);                   \
    case DType::kFloat64: return F<double>(__VA_ARGS__);                  \
    case DType::kFloat16: return F<__half>(__VA_ARGS__);                  \
    case DType::kBFloat16: return F<__nv_bfloat16>(__VA_ARGS__);          \
  }                                                                       \
  return cudaErrorInvalidValue;

}  // namespace cuda
}  // namespace fca
