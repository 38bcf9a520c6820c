// Launchers of the CUDA kernels: raw pointers, sizes and a stream, no torch headers, so that
// every .cu file compiles with plain nvcc (CI compiles them for sm_80 and sm_90 on a machine
// whose torch has no CUDA). bindings.cpp validates tensors and calls these on the current stream.
// Every launcher returns the launch's cudaError_t (cudaGetLastError), never synchronises.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fca {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// codes[r] = sum_b [proj[r, b] > offsets[b]] << b; proj (rows, bits) and offsets in float32 or float64.
cudaError_t pack_codes(const void* proj, const void* offsets, DType dtype, int64_t rows, int64_t bits, int64_t* codes,
                       cudaStream_t stream);

// Lloyd's k-means in Hamming space, one block per (n, h) row; see csrc/cpu/kmeans.cpp for the
// semantics. padded may be null. scratch: rows * clusters * 65 int32 of global memory, used when the
// per-cluster bit counters do not fit in shared memory (may be null otherwise; see kmeans_scratch).
int64_t kmeans_scratch(int64_t rows, int64_t clusters);
cudaError_t hamming_kmeans(const int64_t* codes, const int64_t* init, const int64_t* reseed, const bool* padded,
                           int64_t n, int64_t h, int64_t length, int64_t clusters, int64_t iterations,
                           int64_t hash_bits, int64_t* assignment, int64_t* counts, int32_t* scratch,
                           cudaStream_t stream);

// Members of cluster c of row r: order[r * length + offsets[r * (clusters + 1) + c] ...].
// out[r, c, :] = sum of x[r, l, :] over the members (deterministic, in member order).
cudaError_t cluster_sum(const void* x, DType dtype, const int64_t* order, const int64_t* offsets, int64_t rows,
                        int64_t length, int64_t clusters, int64_t d, void* out, cudaStream_t stream);
// out[r, l, :] = y[r, assignment[r, l], :], zero where assignment is -1.
cudaError_t cluster_broadcast(const void* y, DType dtype, const int64_t* assignment, int64_t rows, int64_t length,
                              int64_t clusters, int64_t d, void* out, cudaStream_t stream);

// top[row, :] = the k best keys of attn[row, :] (float32 or float64), best first, ties to the lower
// index, padded keys (padded[n, t], may be null) below every real key. rows = n * rows_per_batch.
cudaError_t topk_select(const void* attn, DType dtype, const bool* padded, int64_t n, int64_t rows_per_batch,
                        int64_t s, int64_t k, int64_t* top, cudaStream_t stream);

struct TopkShapes {
  int64_t n, h, length, s, e, m, clusters, k;
};
// Largest dynamic shared memory (bytes) a block of the top-k kernels needs for these shapes.
int64_t topk_attention_smem(const TopkShapes& sh, bool backward, DType dtype);
// out (T) and weights (float32; float64 for float64 inputs) for every query, zero rows for queries
// with no cluster (they are not in order).
cudaError_t topk_attention_forward(const void* q, const void* k, const void* v, DType dtype, const int64_t* order,
                                   const int64_t* offsets, const int64_t* top, const bool* padded,
                                   const TopkShapes& sh, double scale, void* out, void* weights,
                                   cudaStream_t stream);
// gq (T, written for every clustered query, must be zeroed for the others), gk and gv
// accumulated atomically into zeroed float32 (float64) buffers.
cudaError_t topk_attention_backward(const void* grad_out, const void* q, const void* k, const void* v, DType dtype,
                                    const void* weights, const int64_t* order, const int64_t* offsets,
                                    const int64_t* top, const TopkShapes& sh, double scale, void* gq,
                                    void* gk_acc, void* gv_acc, cudaStream_t stream);

}  // namespace cuda
}  // namespace fca
