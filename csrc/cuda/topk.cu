// Per-row top-k selection over the centroid attention (the softmax is ATen's, in bindings.cpp):
// k rounds of a block-wide argmax over the entries ranked strictly after the previous winner in
// the order (value descending, index ascending), padded keys valued -1. No sort, no extra memory.
#include "cuda_common.cuh"

namespace fca {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// a ranks strictly before b
template <typename A>
__device__ __forceinline__ bool before(A av, int64_t ai, A bv, int64_t bi) {
  return av > bv || (av == bv && ai < bi);
}

template <typename T>
__global__ void topk_select_kernel(const T* __restrict__ attn, const bool* __restrict__ padded,
                                   int64_t rows_per_batch, int64_t s, int64_t k, int64_t* __restrict__ top) {
  __shared__ T best_v[kThreads / 32];
  __shared__ int64_t best_i[kThreads / 32];
  __shared__ T prev_v;
  __shared__ int64_t prev_i;
  const int64_t row = blockIdx.x;
  const T* a = attn + row * s;
  const bool* pad = padded != nullptr ? padded + (row / rows_per_batch) * s : nullptr;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Before the first round nothing is excluded: a virtual previous winner above everything.
  T pv = T(2);
  int64_t pi = -1;
  for (int64_t round = 0; round < k; ++round) {
    T bv = T(-2);
    int64_t bi = s;  // "nothing" ranks after every real entry
    for (int64_t t = threadIdx.x; t < s; t += blockDim.x) {
      const T v = (pad != nullptr && pad[t]) ? T(-1) : a[t];
      if (before(pv, pi, v, t) && before(v, t, bv, bi)) {
        bv = v;
        bi = t;
      }
    }
    for (int off = 16; off > 0; off >>= 1) {
      const T ov = __shfl_xor_sync(0xffffffffu, bv, off);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, off);
      if (before(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (lane == 0) {
      best_v[warp] = bv;
      best_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      T v = best_v[0];
      int64_t i = best_i[0];
      for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w)
        if (before(best_v[w], best_i[w], v, i)) {
          v = best_v[w];
          i = best_i[w];
        }
      top[row * k + round] = i;
      prev_v = v;
      prev_i = i;
    }
    __syncthreads();
    pv = prev_v;
    pi = prev_i;
  }
}

template <typename T>
cudaError_t launch_select(const void* attn, const bool* padded, int64_t n, int64_t rows_per_batch, int64_t s,
                          int64_t k, int64_t* top, cudaStream_t stream) {
  const int64_t rows = n * rows_per_batch;
  if (rows == 0 || k == 0) return cudaSuccess;
  topk_select_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(static_cast<const T*>(attn), padded,
                                                                              rows_per_batch, s, k, top);
  return cudaGetLastError();
}

}  // namespace

cudaError_t topk_select(const void* attn, DType dtype, const bool* padded, int64_t n, int64_t rows_per_batch,
                        int64_t s, int64_t k, int64_t* top, cudaStream_t stream) {
  if (dtype == DType::kFloat32) return launch_select<float>(attn, padded, n, rows_per_batch, s, k, top, stream);
  if (dtype == DType::kFloat64) return launch_select<double>(attn, padded, n, rows_per_batch, s, k, top, stream);
  return cudaErrorInvalidValue;  // the centroid attention is float32 or float64
}

}  // namespace cuda
}  // namespace fca
