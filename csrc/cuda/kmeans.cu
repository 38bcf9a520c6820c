// Lloyd's k-means in Hamming space on packed codes, one block per (n, h) row (DESIGN.md §2;
// semantics and tie rules as csrc/cpu/kmeans.cpp). The random draws (init, reseed positions)
// come from the caller, so nothing here synchronises with the host. Centroids live in shared
// memory; the per-cluster bit counters too when they fit, else in global scratch.
#include "cuda_common.cuh"

namespace fca {
namespace cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int64_t kSharedCounterClusters = 160;  // 160 * 65 * 4 bytes + centroids < 48 KiB

__device__ __forceinline__ int64_t nearest(unsigned long long h, const unsigned long long* centroids,
                                           int64_t clusters) {
  int64_t best = 0;
  int best_dist = 65;
  for (int64_t j = 0; j < clusters; ++j) {
    const int d = __popcll(h ^ centroids[j]);
    if (d < best_dist) {  // strictly smaller: ties keep the lowest index
      best_dist = d;
      best = j;
    }
  }
  return best;
}

__global__ void kmeans_kernel(const int64_t* __restrict__ codes, const int64_t* __restrict__ init,
                              const int64_t* __restrict__ reseed, const bool* __restrict__ padded, int64_t h,
                              int64_t length, int64_t clusters, int64_t iterations, int64_t hash_bits,
                              int64_t* __restrict__ assignment, int64_t* __restrict__ counts,
                              int32_t* __restrict__ scratch) {
  extern __shared__ unsigned long long smem[];
  unsigned long long* centroids = smem;  // (clusters)
  const int64_t r = blockIdx.x, rows = gridDim.x;
  // counters: per cluster, 64 bit counts then the size (65 int32)
  int32_t* counters = scratch != nullptr ? scratch + r * clusters * 65 : reinterpret_cast<int32_t*>(smem + clusters);
  const int64_t* row_codes = codes + r * length;
  const bool* row_pad = padded != nullptr ? padded + (r / h) * length : nullptr;
  int64_t* row_assign = assignment + r * length;
  const unsigned long long keep = (1ull << hash_bits) - 1ull;

  for (int64_t j = threadIdx.x; j < clusters; j += blockDim.x)
    centroids[j] = static_cast<unsigned long long>(row_codes[init[r * clusters + j]]);
  __syncthreads();
  for (int64_t it = 0; it <= iterations; ++it) {
    const bool last = it == iterations;
    if (!last)
      for (int64_t i = threadIdx.x; i < clusters * 65; i += blockDim.x) counters[i] = 0;
    __syncthreads();
    for (int64_t l = threadIdx.x; l < length; l += blockDim.x) {
      if (row_pad != nullptr && row_pad[l]) {
        row_assign[l] = -1;
        continue;
      }
      const unsigned long long code = static_cast<unsigned long long>(row_codes[l]);
      const int64_t a = nearest(code, centroids, clusters);
      row_assign[l] = a;
      if (last) {
        atomicAdd(reinterpret_cast<unsigned long long*>(counts + r * clusters + a), 1ull);
        continue;
      }
      int32_t* c = counters + a * 65;
      atomicAdd(c + 64, 1);
      for (unsigned long long bits = code; bits != 0; bits &= bits - 1) atomicAdd(c + (__ffsll(static_cast<long long>(bits)) - 1), 1);
    }
    __syncthreads();
    if (last) break;
    for (int64_t j = threadIdx.x; j < clusters; j += blockDim.x) {
      const int32_t* c = counters + j * 65;
      const int32_t size = c[64];
      if (size == 0) {  // empty: the re-seed position drawn for this cluster at this iteration
        centroids[j] = static_cast<unsigned long long>(row_codes[reseed[(it * rows + r) * clusters + j]]);
        continue;
      }
      unsigned long long centroid = 0;
      for (int b = 0; b < 64; ++b) centroid |= static_cast<unsigned long long>(2 * c[b] > size) << b;
      centroids[j] = centroid & keep;
    }
    __syncthreads();
  }
}

}  // namespace

int64_t kmeans_scratch(int64_t rows, int64_t clusters) {
  return clusters <= kSharedCounterClusters ? 0 : rows * clusters * 65;
}

cudaError_t hamming_kmeans(const int64_t* codes, const int64_t* init, const int64_t* reseed, const bool* padded,
                           int64_t n, int64_t h, int64_t length, int64_t clusters, int64_t iterations,
                           int64_t hash_bits, int64_t* assignment, int64_t* counts, int32_t* scratch,
                           cudaStream_t stream) {
  const int64_t rows = n * h;
  if (rows == 0 || length == 0) return cudaSuccess;
  const bool shared_counters = clusters <= kSharedCounterClusters;
  if (!shared_counters && scratch == nullptr) return cudaErrorInvalidValue;
  const size_t smem = clusters * sizeof(unsigned long long) + (shared_counters ? clusters * 65 * sizeof(int32_t) : 0);
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kmeans_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int threads = length < kThreads ? static_cast<int>((length + 31) / 32 * 32) : kThreads;
  kmeans_kernel<<<static_cast<unsigned>(rows), threads, smem, stream>>>(
      codes, init, reseed, padded, h, length, clusters, iterations, hash_bits, assignment, counts,
      shared_counters ? nullptr : scratch);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fca
