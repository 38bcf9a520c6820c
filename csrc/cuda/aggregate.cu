// Cluster sums (deterministic: members in order, one thread per (cluster, feature)) and the
// broadcast back to the queries.
#include "cuda_common.cuh"

namespace fca {
namespace cuda {
namespace {

template <typename T>
__global__ void cluster_sum_kernel(const T* __restrict__ x, const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ offsets, int64_t length, int64_t clusters, int64_t d,
                                   T* __restrict__ out) {
  using A = typename AccOf<T>::type;
  const int64_t rc = blockIdx.x;  // (row, cluster)
  const int64_t r = rc / clusters, c = rc % clusters;
  const int64_t begin = offsets[r * (clusters + 1) + c], end = offsets[r * (clusters + 1) + c + 1];
  const int64_t* members = order + r * length;
  const T* xr = x + r * length * d;
  for (int64_t f = threadIdx.x; f < d; f += blockDim.x) {
    A acc = A(0);
    for (int64_t i = begin; i < end; ++i) acc += to_acc(xr[members[i] * d + f]);
    out[rc * d + f] = from_acc<T>(acc);
  }
}

template <typename T>
__global__ void cluster_broadcast_kernel(const T* __restrict__ y, const int64_t* __restrict__ assignment,
                                         int64_t length, int64_t clusters, int64_t d, int64_t total,
                                         T* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t f = i % d, rl = i / d;  // (row, query)
  const int64_t a = assignment[rl];
  out[i] = a < 0 ? from_acc<T>(typename AccOf<T>::type(0)) : y[((rl / length) * clusters + a) * d + f];
}

template <typename T>
cudaError_t launch_sum(const void* x, const int64_t* order, const int64_t* offsets, int64_t rows, int64_t length,
                       int64_t clusters, int64_t d, void* out, cudaStream_t stream) {
  if (rows * clusters == 0 || d == 0) return cudaSuccess;
  const int threads = d >= 128 ? 128 : static_cast<int>((d + 31) / 32 * 32);
  cluster_sum_kernel<T><<<static_cast<unsigned>(rows * clusters), threads, 0, stream>>>(
      static_cast<const T*>(x), order, offsets, length, clusters, d, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_broadcast(const void* y, const int64_t* assignment, int64_t rows, int64_t length, int64_t clusters,
                             int64_t d, void* out, cudaStream_t stream) {
  const int64_t total = rows * length * d;
  if (total == 0) return cudaSuccess;
  cluster_broadcast_kernel<T><<<blocks_for(total, 256), 256, 0, stream>>>(
      static_cast<const T*>(y), assignment, length, clusters, d, total, static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t cluster_sum(const void* x, DType dtype, const int64_t* order, const int64_t* offsets, int64_t rows,
                        int64_t length, int64_t clusters, int64_t d, void* out, cudaStream_t stream) {
  FCA_CUDA_DISPATCH(dtype, launch_sum, x, order, offsets, rows, length, clusters, d, out, stream)
}

cudaError_t cluster_broadcast(const void* y, DType dtype, const int64_t* assignment, int64_t rows, int64_t length,
                              int64_t clusters, int64_t d, void* out, cudaStream_t stream) {
  FCA_CUDA_DISPATCH(dtype, launch_broadcast, y, assignment, rows, length, clusters, d, out, stream)
}

}  // namespace cuda
}  // namespace fca
