// Helpers shared by the CPU kernels: argument checks that name the argument, ISA dispatch
// for the hot loops, and a vectorisable exp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fca {

// ---------------------------------------------------------------------------------------------
// Checks (TORCH_CHECK raises RuntimeError / ValueError-like messages in Python).

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              name, " must be float32 or float64 on CPU, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == dim, name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on one device, got ", a.device(), " and ",
              b.device());
}

// Grain (items per task) for at::parallel_for so that a task does at least ~64k elementary
// operations: below that, waking a second thread costs more than it saves (on a busy node, far more).
inline int64_t grain_for(int64_t work_per_item) {
  constexpr int64_t kMinWork = 1 << 16;
  return work_per_item >= kMinWork ? 1 : (kMinWork + work_per_item - 1) / std::max<int64_t>(work_per_item, 1);
}

// ---------------------------------------------------------------------------------------------
// ISA dispatch. The extension is built once (often on a login node) and run on whatever nodes a
// job lands on, so it is compiled for baseline x86-64 and the hot loops get AVX2 and AVX-512
// variants chosen at run time, not -march=native.

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The best variant this CPU runs; FAIRSEQ_PLUGIN_CPU_ISA=default|avx2 caps it (the tests run
// every variant this way, and it helps to compare them).
inline Isa cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa best = Isa::kDefault;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vpopcntdq"))
      best = Isa::kAvx512;
    const char* cap = std::getenv("FAIRSEQ_PLUGIN_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "default") == 0) return Isa::kDefault;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512) return Isa::kAvx2;
    return best;
  }();
  return isa;
#else
  return Isa::kDefault;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FCA_TARGET_AVX512 __attribute__((target("avx2,fma,popcnt,avx512f,avx512vl,avx512bw,avx512dq,avx512vpopcntdq")))
#define FCA_TARGET_AVX2 __attribute__((target("avx2,fma,popcnt")))
#define FCA_HAVE_MULTIVERSION 1
#else
#define FCA_TARGET_AVX512
#define FCA_TARGET_AVX2
#define FCA_HAVE_MULTIVERSION 0
#endif
#define FCA_INLINE inline __attribute__((always_inline))

// Define NAME_avx512, NAME_avx2 and NAME_default wrappers around the always-inline template
// NAME_body<T, VB>, VB being the vector width in bytes the variant computes with (64, 32, 16),
// and NAME<T>(...) that picks one at run time.
#define FCA_MULTIVERSION(NAME)                                                                  \
  template <typename T, typename... A>                                                          \
  FCA_TARGET_AVX512 void NAME##_avx512(A... a) { NAME##_body<T, 64>(a...); }                    \
  template <typename T, typename... A>                                                          \
  FCA_TARGET_AVX2 void NAME##_avx2(A... a) { NAME##_body<T, 32>(a...); }                        \
  template <typename T, typename... A>                                                          \
  void NAME##_default(A... a) { NAME##_body<T, 16>(a...); }                                     \
  template <typename T, typename... A>                                                          \
  void NAME(A... a) {                                                                           \
    switch (::fca::cpu_isa()) {                                                                 \
      case ::fca::Isa::kAvx512: return NAME##_avx512<T, A...>(a...);                           \
      case ::fca::Isa::kAvx2: return NAME##_avx2<T, A...>(a...);                                \
      default: return NAME##_default<T, A...>(a...);                                            \
    }                                                                                           \
  }

// exp(x) for x <= 0 (softmax after subtracting the row max), branch-free so loops over it
// vectorise: 2^n * p(r) with r in [-ln2/2, ln2/2] and a degree-6 polynomial; relative error
// about 2e-7 in float. Inputs below -87 (and -inf) give exp(-87) ~ 1.6e-38, not 0: callers
// give masked entries weight 0 themselves. Double uses std::exp (gradcheck, tests).
FCA_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38, still normal; -inf lands here too
  x = x > 0.0f ? 0.0f : x;      // keeps 2^n representable whatever the caller passes
  const float n = __builtin_rintf(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
FCA_INLINE double exp_nonpositive(double x) { return std::exp(x); }

// exp_nonpositive on a vector of floats, in vector-extension operations only (rounding by the
// 1.5 * 2^23 trick, valid here since |x| <= 87).
template <typename V>
FCA_INLINE V exp_nonpositive_vec(V x) {
  typedef int32_t IV __attribute__((vector_size(sizeof(V))));
  const V lo = -87.0f - V{}, zero = V{};
  x = x < lo ? lo : x;
  x = x > zero ? zero : x;
  const V magic = 12582912.0f - V{};
  const V n = (x * 1.44269504088896341f + magic) - magic;
  const V r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  V p = 1.0f / 720.0f - V{};
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const IV bits = (__builtin_convertvector(n, IV) + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// A VB-byte vector of T (GCC/Clang vector extension): one register of the variant's ISA
// (64 bytes: AVX-512, 32: AVX2, 16: SSE). Explicit vectors keep the blocked loops vectorised
// along the axis we choose, with their accumulators in registers.
template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
  static constexpr int64_t size = VB / sizeof(T);
};
// The widest variant's lane count: tiles are padded to a multiple of it, which is a multiple of
// every narrower variant's.
template <typename T>
constexpr int64_t kMaxLanes = 64 / sizeof(T);

template <typename V, typename T>
FCA_INLINE V load_vec(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
FCA_INLINE void store_vec(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// Sum of the lanes of a vector.
template <typename T, typename V>
FCA_INLINE T hsum(const V& v) {
  constexpr int64_t n = sizeof(V) / sizeof(T);
  T lanes[n];
  __builtin_memcpy(lanes, &v, sizeof(V));
  T total = T(0);
  for (int64_t i = 0; i < n; ++i) total += lanes[i];
  return total;
}

// exp of a vector of non-positive arguments (x - max): the vectorised approximation for float,
// std::exp lane by lane for double.
template <typename T, int VB>
FCA_INLINE typename Vec<T, VB>::type exp_vec(typename Vec<T, VB>::type x) {
  if constexpr (std::is_same_v<T, float>) {
    return exp_nonpositive_vec(x);
  } else {
    for (int64_t i = 0; i < Vec<T, VB>::size; ++i) x[i] = std::exp(x[i]);
    return x;
  }
}

// In place over n (a multiple of the vector size) scores: w_t = allowed_t exp(s_t - max over
// allowed s) / sum, all zero when nothing is allowed (allowed_t is 1 or 0).
template <typename T, int VB>
FCA_INLINE void masked_softmax(T* s, const T* allowed, int64_t n) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t W = Vec<T, VB>::size;
  const T lowest = std::numeric_limits<T>::lowest();
  V mx = lowest - V{};
  for (int64_t t = 0; t < n; t += W) {
    const V a = load_vec<V>(allowed + t), x = load_vec<V>(s + t);
    const V v = a != T(0) ? x : lowest - V{};
    mx = mx > v ? mx : v;
  }
  T lanes[W];
  __builtin_memcpy(lanes, &mx, sizeof(V));
  T m = lowest;
  for (int64_t i = 0; i < W; ++i) m = lanes[i] > m ? lanes[i] : m;
  V sum = V{};
  for (int64_t t = 0; t < n; t += W) {
    const V a = load_vec<V>(allowed + t), x = load_vec<V>(s + t);
    // Padded keys may score above the max: give exp a harmless argument and the weight 0.
    V arg = a != T(0) ? x - m : T(-100) - V{};
    const V e = a * exp_vec<T, VB>(arg);
    store_vec(s + t, e);
    sum += e;
  }
  const T total = hsum<T>(sum);
  const T inv = total > T(0) ? T(1) / total : T(0);  // 0: every key padded (no real key)
  for (int64_t t = 0; t < n; t += W) store_vec(s + t, load_vec<V>(s + t) * inv);
}

// ---------------------------------------------------------------------------------------------
// GEMM on row-major blocks inside a parallel task, without the cost of creating tensors: the
// Fortran entry points of the BLAS torch itself links (MKL in the x86 wheels, OpenBLAS in others),
// which torch's CPU library exports. They are declared weak, so the extension still loads against
// a torch without them; the call then goes through ATen on views of the same memory, as it also
// does with FAIRSEQ_PLUGIN_CPU_BLAS=aten (which the tests use to check that path).

}  // namespace fca

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fca {

inline bool blas_direct() {
  static const bool direct = [] {
    const char* choice = std::getenv("FAIRSEQ_PLUGIN_CPU_BLAS");
    return sgemm_ != nullptr && dgemm_ != nullptr && !(choice != nullptr && std::strcmp(choice, "aten") == 0);
  }();
  return direct;
}

// c = alpha op(a) op(b) + beta c, all row-major: op(a) (m, kd), stored (m, kd) or, with trans_a,
// (kd, m), row stride lda; op(b) (kd, n), stored (kd, n) or, with trans_b, (n, kd), row stride ldb;
// c (m, n), row stride ldc; beta 0 (c is then only written) or 1. Called from inside
// at::parallel_for, the BLAS runs on the calling thread.
template <typename T>
void gemm_rows(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t kd, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (blas_direct()) {
    // Row-major c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T, on the arrays as they are.
    const char tb = trans_b ? 'T' : 'N', ta = trans_a ? 'T' : 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(kd);
    const int ldbi = static_cast<int>(ldb), ldai = static_cast<int>(lda), ldci = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&tb, &ta, &mi, &ni, &ki, &alpha, b, &ldbi, a, &ldai, &beta, c, &ldci);
    } else {
      dgemm_(&tb, &ta, &mi, &ni, &ki, &alpha, b, &ldbi, a, &ldai, &beta, c, &ldci);
    }
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor av = trans_a ? at::from_blob(const_cast<T*>(a), {kd, m}, {lda, 1}, opts).t()
                                : at::from_blob(const_cast<T*>(a), {m, kd}, {lda, 1}, opts);
  const at::Tensor bv = trans_b ? at::from_blob(const_cast<T*>(b), {n, kd}, {ldb, 1}, opts).t()
                                : at::from_blob(const_cast<T*>(b), {kd, n}, {ldb, 1}, opts);
  at::Tensor cv = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  const at::Tensor product = kd == 0 ? at::zeros({m, n}, opts) : at::mm(av, bv);
  if (beta == T(0)) {
    cv.copy_(product.mul_(alpha));
  } else {
    cv.add_(product, alpha);
  }
}

template <typename T>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };

}  // namespace fca
