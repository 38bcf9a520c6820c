// LSH: pack the thresholded projections into int64 codes (the GEMM is cuBLAS, in bindings.cpp).
#include "cuda_common.cuh"

namespace fca {
namespace cuda {
namespace {

template <typename T>
__global__ void pack_codes_kernel(const T* __restrict__ proj, const T* __restrict__ offsets, int64_t rows,
                                  int64_t bits, int64_t* __restrict__ codes) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const T* p = proj + r * bits;
  unsigned long long code = 0;
  for (int64_t b = 0; b < bits; ++b) code |= static_cast<unsigned long long>(p[b] > offsets[b]) << b;
  codes[r] = static_cast<int64_t>(code);
}

template <typename T>
cudaError_t launch_pack(const void* proj, const void* offsets, int64_t rows, int64_t bits, int64_t* codes,
                        cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  pack_codes_kernel<T><<<blocks_for(rows, 256), 256, 0, stream>>>(static_cast<const T*>(proj),
                                                                   static_cast<const T*>(offsets), rows, bits, codes);
  return cudaGetLastError();
}

}  // namespace

cudaError_t pack_codes(const void* proj, const void* offsets, DType dtype, int64_t rows, int64_t bits, int64_t* codes,
                       cudaStream_t stream) {
  if (dtype == DType::kFloat32) return launch_pack<float>(proj, offsets, rows, bits, codes, stream);
  if (dtype == DType::kFloat64) return launch_pack<double>(proj, offsets, rows, bits, codes, stream);
  return cudaErrorInvalidValue;  // projections are computed in float32 or float64
}

}  // namespace cuda
}  // namespace fca
