// The clustered sparse products of i-clustered attention (DESIGN.md §2):
//
//   forward   out_i = sum_{t in T_j} w_it v_t,  w_i = softmax_t(scale * q_i . k_t),  j = cluster of i
//   backward  the gradients of out with respect to q, k and v, given the saved weights w.
//
// Queries are grouped by cluster (a counting sort per (n, h)), so the k keys and values of a
// cluster are gathered once into small contiguous tiles, laid out so that the inner loops run
// over t (scores) and over the feature axis (outputs) and vectorise. Nothing of size L x k x E is
// materialised (the reference gathers k keys and values per query). Padded keys inside a top-k
// set get weight 0; padded queries (assignment -1) get a zero row. Backward accumulates each
// cluster's key/value gradients in a tile and adds it once, in cluster order: deterministic.
#include "cpu_common.h"

#include <torch/library.h>

#include <limits>
#include <utility>
#include <vector>

namespace fca {
namespace {

struct Shapes {
  int64_t n, h, length, s, e, m, clusters, k;
};

// members of every cluster of one (n, h): order[offsets[j] .. offsets[j + 1]).
void group_by_cluster(const int64_t* assignment, int64_t length, int64_t clusters, int64_t* order,
                      int64_t* offsets) {
  std::fill(offsets, offsets + clusters + 1, 0);
  for (int64_t l = 0; l < length; ++l) {
    const int64_t a = assignment[l];
    TORCH_CHECK(a < clusters, "assignment holds cluster ", a, " >= C = ", clusters, " (top.size(2))");
    if (a >= 0) offsets[a + 1] += 1;
  }
  for (int64_t j = 0; j < clusters; ++j) offsets[j + 1] += offsets[j];
  std::vector<int64_t> fill(offsets, offsets + clusters);
  for (int64_t l = 0; l < length; ++l)
    if (assignment[l] >= 0) order[fill[assignment[l]]++] = l;
}

// The register-blocked loops run on vectors of the variant's width (cpu_common.h: Vec); tiles
// are padded to a multiple of it, so every inner loop has a constant trip count, keeps its
// accumulators in registers and needs no tail.

inline int64_t round_up(int64_t x, int64_t w) { return (x + w - 1) / w * w; }

// Backward: a cluster's members are gathered kChunk at a time into contiguous blocks, and every
// product of the backward is a small matrix product over those blocks (tile_gemm).
constexpr int64_t kChunk = 64;

// Forward: G members at a time against NV vectors of keys (or of value features): G x NV
// accumulators in registers (12 of AVX2's 16, 16 of AVX-512's 32), and each tile row loaded
// serves G queries. kMaxG is the largest G of any variant.
template <int VB>
constexpr int kGroup = VB == 64 ? 4 : 3;
constexpr int kMaxG = 4;
constexpr int kNV = 4;

// Scratch sizes (elements) of the forward and backward tiles for k keys, E and M features.
template <typename T>
int64_t forward_scratch(int64_t k, int64_t e, int64_t m) {
  const int64_t kp = round_up(k, kMaxLanes<T>), mp = round_up(m, kMaxLanes<T>);
  return e * kp + kp * mp + kp + kMaxG * kp + kMaxLanes<T>;
}
template <typename T>
int64_t backward_scratch(int64_t k, int64_t e, int64_t m) {
  const int64_t kp = round_up(k, kMaxLanes<T>), ep = round_up(e, kMaxLanes<T>), mp = round_up(m, kMaxLanes<T>);
  return 2 * kp * ep + 2 * kp * mp + kChunk * (2 * kp + 2 * ep + mp);
}

// In-register transpose of W vectors of W lanes: at level B, rows i and i + B (bit B of i clear)
// exchange bit B of the row and the column index, two two-source shuffles per pair; all levels
// together exchange every bit, which is the transpose (log2(W) levels, W shuffles each).
template <int B, typename V, std::size_t... I>
FCA_INLINE void swap_blocks(V& a, V& b, std::index_sequence<I...>) {
  constexpr int W = sizeof...(I);
  const V lo = __builtin_shufflevector(a, b, ((I & B) ? W + I - B : I)...);
  const V hi = __builtin_shufflevector(a, b, ((I & B) ? W + I : I + B)...);
  a = lo;
  b = hi;
}
template <int B, int W, typename V>
FCA_INLINE void transpose_levels(V* r) {
  if constexpr (B >= 1) {
    for (int i = 0; i < W; ++i)
      if ((i & B) == 0) swap_blocks<B>(r[i], r[i + B], std::make_index_sequence<W>{});
    transpose_levels<B / 2, W>(r);
  }
}

// s[g][t0 + x] = scale * q_g . k_(t0 + x) for G queries and NV * W keys of the transposed tile kt.
template <typename T, int VB, int G, int NV>
FCA_INLINE void scores_block(const T* const* qrow, const T* kt, int64_t kp, int64_t e_dim, int64_t t0, T scale,
                             T* s) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t W = Vec<T, VB>::size;
  V acc[G][NV] = {};
  for (int64_t e = 0; e < e_dim; ++e) {
    V row[NV];
    for (int v = 0; v < NV; ++v) row[v] = load_vec<V>(kt + e * kp + t0 + v * W);
    for (int g = 0; g < G; ++g) {
      const T b = qrow[g][e];
      for (int v = 0; v < NV; ++v) acc[g][v] += b * row[v];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) store_vec(s + g * kp + t0 + v * W, acc[g][v] * scale);
}

// out_g[m0 + x] = sum_t w_gt v_t[m0 + x] for G queries and NV * W features of the value tile vt;
// a vector that reaches past M goes through tmp, so no row of out is overrun.
template <typename T, int VB, int G, int NV>
FCA_INLINE void values_block(const T* s, int64_t kp, const T* vt, int64_t k, int64_t mp, int64_t m_dim, int64_t m0,
                             T* const* orow, T* tmp) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t W = Vec<T, VB>::size;
  V acc[G][NV] = {};
  for (int64_t t = 0; t < k; ++t) {
    V row[NV];
    for (int v = 0; v < NV; ++v) row[v] = load_vec<V>(vt + t * mp + m0 + v * W);
    for (int g = 0; g < G; ++g) {
      const T w = s[g * kp + t];
      for (int v = 0; v < NV; ++v) acc[g][v] += w * row[v];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) {
      const int64_t m = m0 + v * W;
      if (m + W <= m_dim) {
        store_vec(orow[g] + m, acc[g][v]);
      } else {
        store_vec(tmp, acc[g][v]);
        for (int64_t x = 0; x < m_dim - m; ++x) orow[g][m + x] = tmp[x];
      }
    }
}

// G members (rows qrow, outputs orow, weights wrow) of one cluster against its gathered tiles.
template <typename T, int VB, int G>
FCA_INLINE void forward_group(const T* const* qrow, T* const* orow, T* const* wrow, const T* kt, const T* vt,
                              const T* allowed, int64_t k, int64_t e_dim, int64_t m_dim, T scale, T* s, T* tmp) {
  constexpr int64_t W = Vec<T, VB>::size;
  const int64_t kp = round_up(k, W), mp = round_up(m_dim, W);
  for (int64_t t0 = 0; t0 < kp; t0 += kNV * W) {
    switch ((kp - t0) / W) {
      case 1: scores_block<T, VB, G, 1>(qrow, kt, kp, e_dim, t0, scale, s); break;
      case 2: scores_block<T, VB, G, 2>(qrow, kt, kp, e_dim, t0, scale, s); break;
      case 3: scores_block<T, VB, G, 3>(qrow, kt, kp, e_dim, t0, scale, s); break;
      default: scores_block<T, VB, G, kNV>(qrow, kt, kp, e_dim, t0, scale, s); break;
    }
  }
  for (int g = 0; g < G; ++g) masked_softmax<T, VB>(s + g * kp, allowed, kp);
  for (int64_t m0 = 0; m0 < mp; m0 += kNV * W) {
    switch ((mp - m0) / W) {
      case 1: values_block<T, VB, G, 1>(s, kp, vt, k, mp, m_dim, m0, orow, tmp); break;
      case 2: values_block<T, VB, G, 2>(s, kp, vt, k, mp, m_dim, m0, orow, tmp); break;
      case 3: values_block<T, VB, G, 3>(s, kp, vt, k, mp, m_dim, m0, orow, tmp); break;
      default: values_block<T, VB, G, kNV>(s, kp, vt, k, mp, m_dim, m0, orow, tmp); break;
    }
  }
  if (wrow != nullptr)
    for (int g = 0; g < G; ++g) std::copy(s + g * kp, s + g * kp + k, wrow[g]);
}

// One cluster of one (n, h): gather its keys (transposed, E x kp, W x W blocks transposed in
// registers) and values (kp x mp) into zero-padded tiles, then the members' scores, softmax and
// weighted sums, G members at a time (a short last group runs with fewer). weights == nullptr:
// they are not kept, and each output row becomes mass * row + rest (topk_attention_combine).
template <typename T, int VB>
FCA_INLINE void forward_cluster_body(const T* q, const T* key, const T* value, const bool* kpad,
                                     const int64_t* members, int64_t count, const int64_t* top, int64_t k,
                                     int64_t e_dim, int64_t m_dim, T scale, T* out, T* weights, T mass,
                                     const T* rest, T* scratch) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t W = Vec<T, VB>::size;
  constexpr int G = kGroup<VB>;
  const int64_t kp = round_up(k, W), mp = round_up(m_dim, W);
  T* kt = scratch;               // (E, kp)
  T* vt = kt + e_dim * kp;       // (kp, mp)
  T* allowed = vt + kp * mp;     // (kp): 1 real key, 0 padded key or padding column
  T* s = allowed + kp;           // (G, kp): scores, then weights
  T* tmp = s + kMaxG * kp;       // (W): a partial output vector
  const int64_t ev = e_dim / W * W;
  for (int64_t t0 = 0; t0 < kp; t0 += W) {
    const T* src[W];
    for (int64_t x = 0; x < W; ++x) src[x] = t0 + x < k ? key + top[t0 + x] * e_dim : nullptr;
    for (int64_t e0 = 0; e0 < ev; e0 += W) {
      V r[W];
      for (int64_t x = 0; x < W; ++x) r[x] = src[x] != nullptr ? load_vec<V>(src[x] + e0) : V{};
      transpose_levels<W / 2, W>(r);
      for (int64_t x = 0; x < W; ++x) store_vec(kt + (e0 + x) * kp + t0, r[x]);
    }
    for (int64_t e = ev; e < e_dim; ++e)
      for (int64_t x = 0; x < W; ++x) kt[e * kp + t0 + x] = src[x] != nullptr ? src[x][e] : T(0);
  }
  for (int64_t t = 0; t < kp; ++t) {
    T* vr = vt + t * mp;
    if (t < k) {
      const int64_t key_index = top[t];
      std::copy(value + key_index * m_dim, value + (key_index + 1) * m_dim, vr);
      std::fill(vr + m_dim, vr + mp, T(0));
      allowed[t] = (kpad != nullptr && kpad[key_index]) ? T(0) : T(1);
    } else {
      std::fill(vr, vr + mp, T(0));
      allowed[t] = T(0);
    }
  }
  for (int64_t g0 = 0; g0 < count; g0 += G) {
    const int64_t group = count - g0 < G ? count - g0 : G;
    // Members are scattered over the sequence: fetch the next group's rows while this one computes.
    for (int64_t g = g0 + G; g < g0 + 2 * G && g < count; ++g) {
      for (int64_t off = 0; off < e_dim; off += 64 / static_cast<int64_t>(sizeof(T)))
        __builtin_prefetch(q + members[g] * e_dim + off);
      for (int64_t off = 0; off < m_dim; off += 64 / static_cast<int64_t>(sizeof(T)))
        __builtin_prefetch(out + members[g] * m_dim + off, 1);
    }
    const T* qrow[G] = {};
    T* orow[G] = {};
    T* wrow[G] = {};
    for (int64_t g = 0; g < group; ++g) {
      const int64_t i = members[g0 + g];
      qrow[g] = q + i * e_dim;
      orow[g] = out + i * m_dim;
      if (weights != nullptr) wrow[g] = weights + i * k;
    }
    T* const* wr = weights != nullptr ? wrow : nullptr;
    switch (group) {
      case 1: forward_group<T, VB, 1>(qrow, orow, wr, kt, vt, allowed, k, e_dim, m_dim, scale, s, tmp); break;
      case 2: forward_group<T, VB, 2>(qrow, orow, wr, kt, vt, allowed, k, e_dim, m_dim, scale, s, tmp); break;
      case 3: forward_group<T, VB, 3>(qrow, orow, wr, kt, vt, allowed, k, e_dim, m_dim, scale, s, tmp); break;
      default: forward_group<T, VB, G>(qrow, orow, wr, kt, vt, allowed, k, e_dim, m_dim, scale, s, tmp); break;
    }
    if (rest != nullptr)
      for (int64_t g = 0; g < group; ++g)
        for (int64_t x = 0; x < m_dim; ++x) orow[g][x] = mass * orow[g][x] + rest[x];
  }
}
FCA_MULTIVERSION(forward_cluster)

// c[r][x] = (c[r][x] if accumulate, else 0) + sum_i a[r * ars + i * acs] b[i][x], for R rows and NV
// vectors of x, i < kd: R x NV accumulators in registers; each row of b loaded serves R rows.
template <typename T, int VB, int R, int NV>
FCA_INLINE void tile_block(const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb, int64_t kd, T* c,
                           int64_t ldc, bool accumulate) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t W = Vec<T, VB>::size;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load_vec<V>(c + r * ldc + v * W) : V{};
  for (int64_t i = 0; i < kd; ++i) {
    V row[NV];
    for (int v = 0; v < NV; ++v) row[v] = load_vec<V>(b + i * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      const T x = a[r * ars + i * acs];
      for (int v = 0; v < NV; ++v) acc[r][v] += x * row[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store_vec(c + r * ldc + v * W, acc[r][v]);
}

// The product above for `rows` rows and NV vectors of columns, in blocks of kRows rows.
template <typename T, int VB, int NV>
FCA_INLINE void tile_rows(int64_t rows, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb, int64_t kd,
                          T* c, int64_t ldc, bool accumulate) {
  constexpr int kRows = 6;
  int64_t r0 = 0;
  for (; r0 + kRows <= rows; r0 += kRows)
    tile_block<T, VB, kRows, NV>(a + r0 * ars, ars, acs, b, ldb, kd, c + r0 * ldc, ldc, accumulate);
  switch (rows - r0) {
    case 1: tile_block<T, VB, 1, NV>(a + r0 * ars, ars, acs, b, ldb, kd, c + r0 * ldc, ldc, accumulate); break;
    case 2: tile_block<T, VB, 2, NV>(a + r0 * ars, ars, acs, b, ldb, kd, c + r0 * ldc, ldc, accumulate); break;
    case 3: tile_block<T, VB, 3, NV>(a + r0 * ars, ars, acs, b, ldb, kd, c + r0 * ldc, ldc, accumulate); break;
    case 4: tile_block<T, VB, 4, NV>(a + r0 * ars, ars, acs, b, ldb, kd, c + r0 * ldc, ldc, accumulate); break;
    case 5: tile_block<T, VB, 5, NV>(a + r0 * ars, ars, acs, b, ldb, kd, c + r0 * ldc, ldc, accumulate); break;
    default: break;
  }
}

// ... for `vecs` vectors of columns (c and b padded to whole vectors), 2 at a time.
template <typename T, int VB>
FCA_INLINE void tile_gemm(int64_t rows, int64_t vecs, const T* a, int64_t ars, int64_t acs, const T* b, int64_t ldb,
                          int64_t kd, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t W = Vec<T, VB>::size;
  int64_t v0 = 0;
  for (; v0 + 2 <= vecs; v0 += 2)
    tile_rows<T, VB, 2>(rows, a, ars, acs, b + v0 * W, ldb, kd, c + v0 * W, ldc, accumulate);
  if (v0 < vecs) tile_rows<T, VB, 1>(rows, a, ars, acs, b + v0 * W, ldb, kd, c + v0 * W, ldc, accumulate);
}

// One cluster of one (n, h), backward: dq of the members (written: a query belongs to one cluster),
// and the cluster's contribution to dk and dv accumulated in tiles, then added to the key/value
// rows. Members are gathered kChunk at a time (rows of q, grad_out and weights); then, with G the
// chunk's gradient block and K_T, V_T the cluster's keys and values:
//   dw = G V_T^T,  ds = w (dw - rowsum(dw w)) scale,  dq = ds K_T,  dK_T += ds^T Q,  dV_T += w^T G.
template <typename T, int VB>
FCA_INLINE void backward_cluster_body(const T* grad_out, const T* q, const T* key, const T* value,
                                      const T* weights, const int64_t* members, int64_t count, const int64_t* top,
                                      int64_t k, int64_t e_dim, int64_t m_dim, T scale, T* gq, T* gk, T* gv,
                                      T* scratch) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t W = Vec<T, VB>::size;
  constexpr int64_t kAhead = 8, kLine = 64 / static_cast<int64_t>(sizeof(T));
  const int64_t kp = round_up(k, W), ep = round_up(e_dim, W), mp = round_up(m_dim, W);
  T* kr = scratch;                  // (kp, ep) keys, row layout
  T* vt = kr + kp * ep;             // (mp, kp) values, transposed
  T* gk_tile = vt + mp * kp;        // (kp, ep)
  T* gv_tile = gk_tile + kp * ep;   // (kp, mp)
  T* qc = gv_tile + kp * mp;        // (kChunk, ep) the chunk's queries
  T* gc = qc + kChunk * ep;         // (kChunk, mp) their output gradients
  T* wc = gc + kChunk * mp;         // (kChunk, kp) their weights
  T* ds = wc + kChunk * kp;         // (kChunk, kp) dw, then ds
  T* dq = ds + kChunk * kp;         // (kChunk, ep)
  // The caller zeroes scratch once; the padded columns of every block stay zero (only the first
  // e_dim / m_dim / k of a row are ever written), and the gradient tiles are cleared here.
  std::fill(gk_tile, gk_tile + kp * (ep + mp), T(0));
  for (int64_t t = 0; t < k; ++t) {
    const int64_t key_index = top[t];
    std::copy(key + key_index * e_dim, key + (key_index + 1) * e_dim, kr + t * ep);
    const T* vr = value + key_index * m_dim;
    for (int64_t mm = 0; mm < m_dim; ++mm) vt[mm * kp + t] = vr[mm];
  }
  for (int64_t c0 = 0; c0 < count; c0 += kChunk) {
    const int64_t cnt = std::min(kChunk, count - c0);
    for (int64_t g = 0; g < cnt; ++g) {
      if (c0 + g + kAhead < count) {  // members are scattered over the sequence: fetch ahead
        const int64_t ahead = members[c0 + g + kAhead];
        for (int64_t off = 0; off < e_dim; off += kLine) __builtin_prefetch(q + ahead * e_dim + off);
        for (int64_t off = 0; off < m_dim; off += kLine) __builtin_prefetch(grad_out + ahead * m_dim + off);
        for (int64_t off = 0; off < k; off += kLine) __builtin_prefetch(weights + ahead * k + off);
      }
      const int64_t i = members[c0 + g];
      std::copy(q + i * e_dim, q + (i + 1) * e_dim, qc + g * ep);
      std::copy(grad_out + i * m_dim, grad_out + (i + 1) * m_dim, gc + g * mp);
      std::copy(weights + i * k, weights + (i + 1) * k, wc + g * kp);
    }
    tile_gemm<T, VB>(cnt, kp / W, gc, mp, 1, vt, kp, m_dim, ds, kp, false);  // dw = G V_T^T
    for (int64_t g = 0; g < cnt; ++g) {  // ds = w (dw - w . dw) scale = d loss / d (q_i . k_t)
      T* dsg = ds + g * kp;
      const T* wg = wc + g * kp;
      V acc = V{};
      for (int64_t t = 0; t < kp; t += W) acc += load_vec<V>(wg + t) * load_vec<V>(dsg + t);
      const T dot = hsum<T>(acc);
      for (int64_t t = 0; t < kp; t += W) store_vec(dsg + t, load_vec<V>(wg + t) * (load_vec<V>(dsg + t) - dot) * scale);
    }
    tile_gemm<T, VB>(cnt, ep / W, ds, kp, 1, kr, ep, k, dq, ep, false);  // dq = ds K_T
    for (int64_t g = 0; g < cnt; ++g) std::copy(dq + g * ep, dq + g * ep + e_dim, gq + members[c0 + g] * e_dim);
    tile_gemm<T, VB>(k, ep / W, ds, 1, kp, qc, ep, cnt, gk_tile, ep, true);  // dK_T += ds^T Q
    tile_gemm<T, VB>(k, mp / W, wc, 1, kp, gc, mp, cnt, gv_tile, mp, true);  // dV_T += w^T G
  }
  for (int64_t t = 0; t < k; ++t) {
    const int64_t key_index = top[t];
    T* gkr = gk + key_index * e_dim;
    const T* src = gk_tile + t * ep;
    for (int64_t e = 0; e < e_dim; ++e) gkr[e] += src[e];
    T* gvr = gv + key_index * m_dim;
    const T* srcv = gv_tile + t * mp;
    for (int64_t mm = 0; mm < m_dim; ++mm) gvr[mm] += srcv[mm];
  }
}
FCA_MULTIVERSION(backward_cluster)

Shapes check_inputs(const at::Tensor& q, const at::Tensor& key, const at::Tensor& value, const at::Tensor& assignment,
                    const at::Tensor& top) {
  check_dim(q, 4, "q", "(N, H, L, E)");
  check_dim(key, 4, "k", "(N, H, S, E)");
  check_dim(value, 4, "v", "(N, H, S, M)");
  check_dim(assignment, 3, "assignment", "(N, H, L)");
  check_dim(top, 4, "top", "(N, H, C, topk)");
  check_float(q, "q");
  TORCH_CHECK(key.scalar_type() == q.scalar_type() && value.scalar_type() == q.scalar_type(),
              "q, k and v must share one dtype, got ", q.scalar_type(), ", ", key.scalar_type(), ", ",
              value.scalar_type());
  check_index(assignment, "assignment");
  check_index(top, "top");
  for (const auto* t : {&key, &value, &assignment, &top}) check_same_device(q, *t, "q", "every other argument");
  Shapes sh{q.size(0), q.size(1), q.size(2), key.size(2), q.size(3), value.size(3), top.size(2), top.size(3)};
  TORCH_CHECK(key.size(0) == sh.n && key.size(1) == sh.h && key.size(3) == sh.e, "k must have shape (N, H, S, E) = (",
              sh.n, ", ", sh.h, ", S, ", sh.e, "), got ", key.sizes());
  TORCH_CHECK(value.size(0) == sh.n && value.size(1) == sh.h && value.size(2) == sh.s,
              "v must have shape (N, H, S, M) = (", sh.n, ", ", sh.h, ", ", sh.s, ", M), got ", value.sizes());
  TORCH_CHECK(assignment.size(0) == sh.n && assignment.size(1) == sh.h && assignment.size(2) == sh.length,
              "assignment must have shape (N, H, L) = (", sh.n, ", ", sh.h, ", ", sh.length, "), got ",
              assignment.sizes());
  TORCH_CHECK(top.size(0) == sh.n && top.size(1) == sh.h && sh.k >= 1 && sh.k <= sh.s && sh.clusters >= 1,
              "top must have shape (N, H, C, topk) with 1 <= topk <= S = ", sh.s, ", got ", top.sizes());
  TORCH_CHECK(top.numel() == 0 || (top.min().item<int64_t>() >= 0 && top.max().item<int64_t>() < sh.s),
              "top holds key indices outside 0..S-1");
  return sh;
}

// Per (n, h): the members of each cluster. Returns (order (N*H, L), offsets (N*H, C + 1)).
std::pair<std::vector<int64_t>, std::vector<int64_t>> group_all(const int64_t* assignment, const Shapes& sh) {
  std::vector<int64_t> order(sh.n * sh.h * sh.length), offsets(sh.n * sh.h * (sh.clusters + 1));
  at::parallel_for(0, sh.n * sh.h, grain_for(2 * sh.length), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      group_by_cluster(assignment + r * sh.length, sh.length, sh.clusters, order.data() + r * sh.length,
                       offsets.data() + r * (sh.clusters + 1));
  });
  return {std::move(order), std::move(offsets)};
}

}  // namespace

namespace {

// topk_attention (combine undefined: returns (out, weights)) and topk_attention_combine (combine =
// (mass (N, H, C), rest (N, H, C, M)): returns (mass * out + rest, an empty weights tensor)).
std::tuple<at::Tensor, at::Tensor> topk_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                const at::Tensor& assignment_in, const at::Tensor& top_in,
                                                const std::optional<at::Tensor>& key_padding_mask, double scale,
                                                const at::Tensor* mass_in, const at::Tensor* rest_in) {
  const Shapes sh = check_inputs(q_in, k_in, v_in, assignment_in, top_in);
  at::Tensor padded;
  if (key_padding_mask.has_value()) {
    padded = key_padding_mask->contiguous();
    TORCH_CHECK(padded.scalar_type() == at::kBool, "key_padding_mask must be bool, got ", padded.scalar_type());
    TORCH_CHECK(padded.dim() == 2 && padded.size(0) == sh.n && padded.size(1) == sh.s,
                "key_padding_mask must have shape (N, S) = (", sh.n, ", ", sh.s, "), got ", padded.sizes());
  }
  const bool combine = mass_in != nullptr;
  at::Tensor mass, rest;
  if (combine) {
    TORCH_CHECK(mass_in->sizes() == at::IntArrayRef({sh.n, sh.h, sh.clusters}) &&
                    mass_in->scalar_type() == q_in.scalar_type(),
                "mass must have shape (N, H, C) = (", sh.n, ", ", sh.h, ", ", sh.clusters, ") and the dtype of q, got ",
                mass_in->sizes(), " ", mass_in->scalar_type());
    TORCH_CHECK(rest_in->sizes() == at::IntArrayRef({sh.n, sh.h, sh.clusters, sh.m}) &&
                    rest_in->scalar_type() == q_in.scalar_type(),
                "rest must have shape (N, H, C, M) = (", sh.n, ", ", sh.h, ", ", sh.clusters, ", ", sh.m,
                ") and the dtype of q, got ", rest_in->sizes(), " ", rest_in->scalar_type());
    check_same_device(q_in, *mass_in, "q", "mass");
    check_same_device(q_in, *rest_in, "q", "rest");
    mass = mass_in->contiguous();
    rest = rest_in->contiguous();
  }
  const at::Tensor q = q_in.contiguous(), key = k_in.contiguous(), value = v_in.contiguous();
  const at::Tensor assignment = assignment_in.contiguous(), top = top_in.contiguous();
  at::Tensor out = at::empty({sh.n, sh.h, sh.length, sh.m}, q.options());
  at::Tensor weights = at::empty({sh.n, sh.h, combine ? 0 : sh.length, sh.k}, q.options());
  auto [order, offsets] = group_all(assignment.const_data_ptr<int64_t>(), sh);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "topk_attention", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = key.const_data_ptr<scalar_t>();
    const scalar_t* vp = value.const_data_ptr<scalar_t>();
    const int64_t* tp = top.const_data_ptr<int64_t>();
    const bool* pad = key_padding_mask.has_value() ? padded.const_data_ptr<bool>() : nullptr;
    const scalar_t* mp = combine ? mass.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = combine ? rest.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    scalar_t* wp = combine ? nullptr : weights.mutable_data_ptr<scalar_t>();
    const int64_t scratch_size = forward_scratch<scalar_t>(sh.k, sh.e, sh.m);
    // Every cluster of every (n, h) is an independent task.
    // Padded queries (assignment -1) belong to no cluster: their rows are zero.
    const int64_t* ap = assignment.const_data_ptr<int64_t>();
    at::parallel_for(0, sh.n * sh.h * sh.length, grain_for(sh.m + sh.k), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        if (ap[i] < 0) {
          std::fill(op + i * sh.m, op + (i + 1) * sh.m, scalar_t(0));
          if (wp != nullptr) std::fill(wp + i * sh.k, wp + (i + 1) * sh.k, scalar_t(0));
        }
    });
    at::parallel_for(0, sh.n * sh.h * sh.clusters, grain_for(sh.length / sh.clusters * sh.k * (sh.e + sh.m)), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(scratch_size, scalar_t(0));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / sh.clusters, j = task % sh.clusters;
        const int64_t* off = offsets.data() + r * (sh.clusters + 1);
        if (off[j + 1] == off[j]) continue;
        forward_cluster<scalar_t>(qp + r * sh.length * sh.e, kp + r * sh.s * sh.e, vp + r * sh.s * sh.m,
                                  pad == nullptr ? nullptr : pad + (r / sh.h) * sh.s,
                                  order.data() + r * sh.length + off[j], off[j + 1] - off[j],
                                  tp + (r * sh.clusters + j) * sh.k, sh.k, sh.e, sh.m, static_cast<scalar_t>(scale),
                                  op + r * sh.length * sh.m, wp == nullptr ? nullptr : wp + r * sh.length * sh.k,
                                  combine ? mp[r * sh.clusters + j] : scalar_t(1),
                                  combine ? rp + (r * sh.clusters + j) * sh.m : nullptr, scratch.data());
      }
    });
  });
  return {out, weights};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& assignment, const at::Tensor& top,
                                                      const std::optional<at::Tensor>& key_padding_mask,
                                                      double scale) {
  return topk_forward(q, k, v, assignment, top, key_padding_mask, scale, nullptr, nullptr);
}

at::Tensor topk_attention_combine_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& assignment, const at::Tensor& top, const at::Tensor& mass,
                                      const at::Tensor& rest, const std::optional<at::Tensor>& key_padding_mask,
                                      double scale) {
  return std::get<0>(topk_forward(q, k, v, assignment, top, key_padding_mask, scale, &mass, &rest));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_attention_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& assignment_in, const at::Tensor& top_in, const at::Tensor& weights_in, double scale) {
  const Shapes sh = check_inputs(q_in, k_in, v_in, assignment_in, top_in);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({sh.n, sh.h, sh.length, sh.m}) &&
                  grad_in.scalar_type() == q_in.scalar_type(),
              "grad_out must have the shape (N, H, L, M) and dtype of the output, got ", grad_in.sizes(), " ",
              grad_in.scalar_type());
  TORCH_CHECK(weights_in.sizes() == at::IntArrayRef({sh.n, sh.h, sh.length, sh.k}) &&
                  weights_in.scalar_type() == q_in.scalar_type(),
              "weights must have shape (N, H, L, topk) and the dtype of q, got ", weights_in.sizes(), " ",
              weights_in.scalar_type());
  const at::Tensor grad = grad_in.contiguous(), q = q_in.contiguous(), key = k_in.contiguous();
  const at::Tensor value = v_in.contiguous(), assignment = assignment_in.contiguous(), top = top_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  // gq: every real query's row is written by its cluster, padded queries' rows are zeroed here.
  at::Tensor gq = at::empty_like(q, at::MemoryFormat::Contiguous), gk = at::zeros_like(key), gv = at::zeros_like(value);
  auto [order, offsets] = group_all(assignment.const_data_ptr<int64_t>(), sh);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "topk_attention_backward", [&] {
    const int64_t scratch_size = backward_scratch<scalar_t>(sh.k, sh.e, sh.m);
    const int64_t* ap = assignment.const_data_ptr<int64_t>();
    scalar_t* gqp = gq.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, sh.n * sh.h * sh.length, grain_for(sh.e), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        if (ap[i] < 0) std::fill(gqp + i * sh.e, gqp + (i + 1) * sh.e, scalar_t(0));
    });
    // One (n, h) per task: its clusters write to shared key rows, in cluster order.
    at::parallel_for(0, sh.n * sh.h, grain_for(sh.length * sh.k * (sh.e + sh.m)), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(scratch_size, scalar_t(0));
      for (int64_t r = begin; r < end; ++r) {
        const int64_t* off = offsets.data() + r * (sh.clusters + 1);
        for (int64_t j = 0; j < sh.clusters; ++j) {
          if (off[j + 1] == off[j]) continue;
          backward_cluster<scalar_t>(
              grad.const_data_ptr<scalar_t>() + r * sh.length * sh.m, q.const_data_ptr<scalar_t>() + r * sh.length * sh.e,
              key.const_data_ptr<scalar_t>() + r * sh.s * sh.e, value.const_data_ptr<scalar_t>() + r * sh.s * sh.m,
              weights.const_data_ptr<scalar_t>() + r * sh.length * sh.k, order.data() + r * sh.length + off[j],
              off[j + 1] - off[j], top.const_data_ptr<int64_t>() + (r * sh.clusters + j) * sh.k, sh.k, sh.e, sh.m,
              static_cast<scalar_t>(scale), gq.mutable_data_ptr<scalar_t>() + r * sh.length * sh.e,
              gk.mutable_data_ptr<scalar_t>() + r * sh.s * sh.e, gv.mutable_data_ptr<scalar_t>() + r * sh.s * sh.m,
              scratch.data());
        }
      }
    });
  });
  return {gq, gk, gv};
}

TORCH_LIBRARY_IMPL(fairseq_clustered, CPU, m) {
  m.impl("topk_attention", &topk_attention_cpu);
  m.impl("topk_attention_combine", &topk_attention_combine_cpu);
  m.impl("topk_attention_backward", &topk_attention_backward_cpu);
}

}  // namespace fca
