// The clustered sparse products of i-clustered attention on CUDA (semantics: csrc/cpu/sparse.cpp).
//
// One block per (row, cluster): the cluster's k keys and values are loaded once into shared
// memory (rows padded by one element against bank conflicts) and every member query, one warp
// each, computes its k scores (lanes over keys), a warp-shuffle softmax, and its output (lanes
// over features). Backward runs one warp per (row, cluster) with private shared-memory tiles for
// the key/value gradients, added to float32 (float64) buffers with atomics once per cluster: the
// only non-deterministic summation order, as with index_add_ on CUDA.
#include "cuda_common.cuh"

namespace fca {
namespace cuda {
namespace {

constexpr int kForwardWarps = 4;

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename A>
int64_t forward_smem_elems(const TopkShapes& sh) {
  return sh.k * (sh.e + 1) + sh.k * sh.m + sh.k + kForwardWarps * (sh.e + sh.k);
}
template <typename A>
int64_t backward_smem_elems(const TopkShapes& sh) {
  return sh.k * (sh.e + 1) + sh.k * (sh.m + 1) + sh.k * sh.e + sh.k * sh.m + sh.e + sh.m + 2 * sh.k;
}

template <typename T>
__global__ void topk_forward_kernel(const T* __restrict__ q, const T* __restrict__ key, const T* __restrict__ value,
                                    const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                    const int64_t* __restrict__ top, const bool* __restrict__ padded, TopkShapes sh,
                                    typename AccOf<T>::type scale, T* __restrict__ out,
                                    typename AccOf<T>::type* __restrict__ weights) {
  using A = typename AccOf<T>::type;
  extern __shared__ unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int64_t k = sh.k, e_dim = sh.e, m_dim = sh.m;
  A* kt = smem;                     // (k, E + 1)
  A* vt = kt + k * (e_dim + 1);     // (k, M)
  A* allowed = vt + k * m_dim;      // (k)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  A* qbuf = allowed + k + warp * (e_dim + k);  // (E), this warp's query, scaled
  A* wbuf = qbuf + e_dim;                      // (k), its scores then weights

  const int64_t rc = blockIdx.x, r = rc / sh.clusters, c = rc % sh.clusters;
  const int64_t begin = offsets[r * (sh.clusters + 1) + c], end = offsets[r * (sh.clusters + 1) + c + 1];
  if (begin == end) return;
  const int64_t* keys = top + rc * k;
  const T* kr = key + r * sh.s * e_dim;
  const T* vr = value + r * sh.s * m_dim;
  const bool* pad = padded != nullptr ? padded + (r / sh.h) * sh.s : nullptr;
  for (int64_t i = threadIdx.x; i < k * e_dim; i += blockDim.x) {
    const int64_t t = i / e_dim, f = i % e_dim;
    kt[t * (e_dim + 1) + f] = to_acc(kr[keys[t] * e_dim + f]);
  }
  for (int64_t i = threadIdx.x; i < k * m_dim; i += blockDim.x) {
    const int64_t t = i / m_dim, f = i % m_dim;
    vt[i] = to_acc(vr[keys[t] * m_dim + f]);
  }
  for (int64_t t = threadIdx.x; t < k; t += blockDim.x) allowed[t] = (pad != nullptr && pad[keys[t]]) ? A(0) : A(1);
  __syncthreads();

  const int64_t* members = order + r * sh.length;
  for (int64_t idx = begin + warp; idx < end; idx += kForwardWarps) {
    const int64_t i = members[idx];
    const T* qi = q + (r * sh.length + i) * e_dim;
    for (int64_t f = lane; f < e_dim; f += 32) qbuf[f] = to_acc(qi[f]) * scale;
    __syncwarp();
    A mx = -3.0e38;
    for (int64_t t = lane; t < k; t += 32) {
      A s = A(0);
      const A* row = kt + t * (e_dim + 1);
      for (int64_t f = 0; f < e_dim; ++f) s += qbuf[f] * row[f];
      wbuf[t] = s;
      if (allowed[t] != A(0)) mx = s > mx ? s : mx;
    }
    mx = warp_max(mx);
    A sum = A(0);
    for (int64_t t = lane; t < k; t += 32) {
      const A w = allowed[t] != A(0) ? exp_acc(wbuf[t] - mx) : A(0);
      wbuf[t] = w;
      sum += w;
    }
    sum = warp_sum(sum);
    const A inv = sum > A(0) ? A(1) / sum : A(0);  // 0: every key of the set padded
    A* wi = weights + (r * sh.length + i) * k;
    for (int64_t t = lane; t < k; t += 32) {
      wbuf[t] *= inv;
      wi[t] = wbuf[t];
    }
    __syncwarp();
    T* oi = out + (r * sh.length + i) * m_dim;
    for (int64_t f = lane; f < m_dim; f += 32) {
      A o = A(0);
      for (int64_t t = 0; t < k; ++t) o += wbuf[t] * vt[t * m_dim + f];
      oi[f] = from_acc<T>(o);
    }
    __syncwarp();
  }
}

template <typename T>
__global__ void topk_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ q,
                                     const T* __restrict__ key, const T* __restrict__ value,
                                     const typename AccOf<T>::type* __restrict__ weights,
                                     const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                     const int64_t* __restrict__ top, TopkShapes sh, typename AccOf<T>::type scale,
                                     T* __restrict__ gq, typename AccOf<T>::type* __restrict__ gk_acc,
                                     typename AccOf<T>::type* __restrict__ gv_acc) {
  using A = typename AccOf<T>::type;
  extern __shared__ unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int64_t k = sh.k, e_dim = sh.e, m_dim = sh.m;
  A* kr = smem;                          // (k, E + 1)
  A* vt = kr + k * (e_dim + 1);          // (k, M + 1)
  A* gk_tile = vt + k * (m_dim + 1);     // (k, E)
  A* gv_tile = gk_tile + k * e_dim;      // (k, M)
  A* qbuf = gv_tile + k * m_dim;         // (E)
  A* gobuf = qbuf + e_dim;               // (M)
  A* wbuf = gobuf + m_dim;               // (k)
  A* gsbuf = wbuf + k;                   // (k)
  const int lane = threadIdx.x;

  const int64_t rc = blockIdx.x, r = rc / sh.clusters, c = rc % sh.clusters;
  const int64_t begin = offsets[r * (sh.clusters + 1) + c], end = offsets[r * (sh.clusters + 1) + c + 1];
  if (begin == end) return;
  const int64_t* keys = top + rc * k;
  const T* krow = key + r * sh.s * e_dim;
  const T* vrow = value + r * sh.s * m_dim;
  for (int64_t i = lane; i < k * e_dim; i += 32) {
    const int64_t t = i / e_dim, f = i % e_dim;
    kr[t * (e_dim + 1) + f] = to_acc(krow[keys[t] * e_dim + f]);
    gk_tile[i] = A(0);
  }
  for (int64_t i = lane; i < k * m_dim; i += 32) {
    const int64_t t = i / m_dim, f = i % m_dim;
    vt[t * (m_dim + 1) + f] = to_acc(vrow[keys[t] * m_dim + f]);
    gv_tile[i] = A(0);
  }
  __syncwarp();
  const int64_t* members = order + r * sh.length;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t i = members[idx], row = r * sh.length + i;
    for (int64_t f = lane; f < e_dim; f += 32) qbuf[f] = to_acc(q[row * e_dim + f]);
    for (int64_t f = lane; f < m_dim; f += 32) gobuf[f] = to_acc(grad_out[row * m_dim + f]);
    for (int64_t t = lane; t < k; t += 32) wbuf[t] = weights[row * k + t];
    __syncwarp();
    A dot = A(0);
    for (int64_t t = lane; t < k; t += 32) {  // gw_t = g . v_t
      A gw = A(0);
      const A* vr = vt + t * (m_dim + 1);
      for (int64_t f = 0; f < m_dim; ++f) gw += gobuf[f] * vr[f];
      gsbuf[t] = gw;
      dot += wbuf[t] * gw;
    }
    dot = warp_sum(dot);
    for (int64_t t = lane; t < k; t += 32) gsbuf[t] = wbuf[t] * (gsbuf[t] - dot) * scale;
    __syncwarp();
    for (int64_t f = lane; f < e_dim; f += 32) {  // dq_i = sum_t gs_t k_t
      A acc = A(0);
      for (int64_t t = 0; t < k; ++t) acc += gsbuf[t] * kr[t * (e_dim + 1) + f];
      gq[row * e_dim + f] = from_acc<T>(acc);
    }
    for (int64_t t = 0; t < k; ++t) {  // this warp's private tiles: no atomics
      const A g = gsbuf[t], w = wbuf[t];
      for (int64_t f = lane; f < e_dim; f += 32) gk_tile[t * e_dim + f] += g * qbuf[f];
      for (int64_t f = lane; f < m_dim; f += 32) gv_tile[t * m_dim + f] += w * gobuf[f];
    }
    __syncwarp();
  }
  for (int64_t i = lane; i < k * e_dim; i += 32) {
    const int64_t t = i / e_dim, f = i % e_dim;
    atomicAdd(gk_acc + (r * sh.s + keys[t]) * e_dim + f, gk_tile[i]);
  }
  for (int64_t i = lane; i < k * m_dim; i += 32) {
    const int64_t t = i / m_dim, f = i % m_dim;
    atomicAdd(gv_acc + (r * sh.s + keys[t]) * m_dim + f, gv_tile[i]);
  }
}

template <typename T>
cudaError_t set_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T>
cudaError_t launch_forward(const void* q, const void* k, const void* v, const int64_t* order, const int64_t* offsets,
                           const int64_t* top, const bool* padded, const TopkShapes& sh, double scale, void* out,
                           void* weights, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int64_t blocks = sh.n * sh.h * sh.clusters;
  if (blocks == 0) return cudaSuccess;
  const size_t bytes = forward_smem_elems<A>(sh) * sizeof(A);
  cudaError_t err = set_smem<T>(reinterpret_cast<const void*>(topk_forward_kernel<T>), bytes);
  if (err != cudaSuccess) return err;
  topk_forward_kernel<T><<<static_cast<unsigned>(blocks), 32 * kForwardWarps, bytes, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), order, offsets, top, padded, sh,
      static_cast<A>(scale), static_cast<T*>(out), static_cast<A*>(weights));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* grad_out, const void* q, const void* k, const void* v, const void* weights,
                            const int64_t* order, const int64_t* offsets, const int64_t* top, const TopkShapes& sh,
                            double scale, void* gq, void* gk_acc, void* gv_acc, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int64_t blocks = sh.n * sh.h * sh.clusters;
  if (blocks == 0) return cudaSuccess;
  const size_t bytes = backward_smem_elems<A>(sh) * sizeof(A);
  cudaError_t err = set_smem<T>(reinterpret_cast<const void*>(topk_backward_kernel<T>), bytes);
  if (err != cudaSuccess) return err;
  topk_backward_kernel<T><<<static_cast<unsigned>(blocks), 32, bytes, stream>>>(
      static_cast<const T*>(grad_out), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
      static_cast<const A*>(weights), order, offsets, top, sh, static_cast<A>(scale), static_cast<T*>(gq),
      static_cast<A*>(gk_acc), static_cast<A*>(gv_acc));
  return cudaGetLastError();
}

}  // namespace

int64_t topk_attention_smem(const TopkShapes& sh, bool backward, DType dtype) {
  const bool wide = dtype == DType::kFloat64;
  const int64_t elems = backward ? (wide ? backward_smem_elems<double>(sh) : backward_smem_elems<float>(sh))
                                 : (wide ? forward_smem_elems<double>(sh) : forward_smem_elems<float>(sh));
  return elems * (wide ? 8 : 4);
}

cudaError_t topk_attention_forward(const void* q, const void* k, const void* v, DType dtype, const int64_t* order,
                                   const int64_t* offsets, const int64_t* top, const bool* padded,
                                   const TopkShapes& sh, double scale, void* out, void* weights,
                                   cudaStream_t stream) {
  FCA_CUDA_DISPATCH(dtype, launch_forward, q, k, v, order, offsets, top, padded, sh, scale, out, weights, stream)
}

cudaError_t topk_attention_backward(const void* grad_out, const void* q, const void* k, const void* v, DType dtype,
                                    const void* weights, const int64_t* order, const int64_t* offsets,
                                    const int64_t* top, const TopkShapes& sh, double scale, void* gq,
                                    void* gk_acc, void* gv_acc, cudaStream_t stream) {
  FCA_CUDA_DISPATCH(dtype, launch_backward, grad_out, q, k, v, weights, order, offsets, top, sh, scale, gq, gk_acc,
                    gv_acc, stream)
}

}  // namespace cuda
}  // namespace fca
