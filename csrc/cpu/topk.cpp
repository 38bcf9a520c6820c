// Centroid attention with per-cluster top-k selection (DESIGN.md §2, i-clustered).
//
// softmax_topk(scores, key_padding_mask, topk) -> (attn, top): attn = softmax over the keys of
// the (already scaled) centroid scores with padded keys at weight 0, in float32 (float64 for
// float64 input); top = the min(topk, S) keys of each row ranked by attn, descending, ties to the
// lower key index, every padded key ranked below every real key.
//
// One fused pass per row: the row max, then exp and the sum, then the normalisation, which also
// records group maxima of the ranking values; the selection then bounds the k-th value with those
// maxima and sorts only the few candidates that reach the bound. The selection ranks the weights
// this op returns (not the scores): two scores that round to one weight tie, and go to the lower
// index, exactly as ranking attn would. A row whose softmax is not finite (a NaN or infinite score
// at a real key, or no real key at all) comes out all NaN, like ATen's softmax, and its top is
// its real keys in index order, then its padded ones: always valid, distinct key indices.
#include "cpu_common.h"

#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fca {
namespace {

template <typename T>
struct Entry {
  T value;
  int64_t index;
};

// True when a ranks strictly before b: larger value, or equal value and lower index.
template <typename T>
inline bool before(const Entry<T>& a, const Entry<T>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// Where the group maxima of a row came from: chunks of `per` vectors of `lanes` entries, group
// (c, l) = the entries c * per * lanes + x * lanes + l for x < per. Entries after the last whole
// chunk belong to no group. chunks = 0: no maxima (short row, or a row that is not finite).
struct Groups {
  int64_t lanes, per, chunks;
  bool finite;
};

// The softmax of one row of s scores into w, allowed = 1 for a real key and 0 for a padded one
// (nullptr: all real). Padded keys get exp's harmless argument -100 and the weight 0. The
// normalising pass stores the maxima of the ranking values (the weight, -1 for a padded key) of
// groups of `per` entries, per chosen so that there are at least 4k groups, to g and maxima.
template <typename T, int VB, bool kMasked>
FCA_INLINE void softmax_row_impl(const T* x, const T* allowed, int64_t s, int64_t k, T* w, T* maxima, Groups* g) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t W = Vec<T, VB>::size;
  const T lowest = -std::numeric_limits<T>::infinity();  // a row of -inf scores: inf - inf, NaN as in ATen
  const int64_t sv = s / W * W;  // entries in whole vectors; the rest are a scalar tail
  auto real = [&](int64_t t) { return !kMasked || allowed[t] != T(0); };
  // 1. The max over the real keys.
  V mx = lowest - V{};
  for (int64_t t = 0; t < sv; t += W) {
    V v = load_vec<V>(x + t);
    if constexpr (kMasked) v = load_vec<V>(allowed + t) != T(0) ? v : lowest - V{};
    mx = mx > v ? mx : v;
  }
  T m = lowest;
  for (int64_t i = 0; i < W; ++i) m = mx[i] > m ? mx[i] : m;
  for (int64_t t = sv; t < s; ++t)
    if (real(t)) m = x[t] > m ? x[t] : m;
  // 2. exp(x - m) and the sum. A NaN score, or inf - inf, gives NaN here and in the sum.
  V acc = V{};
  for (int64_t t = 0; t < sv; t += W) {
    V arg = load_vec<V>(x + t) - m;
    if constexpr (kMasked) {
      const V a = load_vec<V>(allowed + t);
      arg = a != T(0) ? arg : T(-100) - V{};
      const V e = a * exp_vec<T, VB>(arg);
      store_vec(w + t, e);
      acc += e;
    } else {
      const V e = exp_vec<T, VB>(arg);
      store_vec(w + t, e);
      acc += e;
    }
  }
  T total = hsum<T>(acc);
  for (int64_t t = sv; t < s; ++t) {
    const T e = real(t) ? exp_nonpositive(x[t] - m) : T(0);
    w[t] = e;
    total += e;
  }
  // 3. Normalise, and take the group maxima of the ranking values.
  g->lanes = W;
  g->chunks = 0;
  g->finite = total > T(0) && total <= std::numeric_limits<T>::max();
  if (!g->finite) {  // NaN, or no real key: ATen's softmax gives NaN there too
    std::fill(w, w + s, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  int64_t per = 1;
  while (per < 64 && (s / (2 * per * W)) * W >= 4 * k) per *= 2;
  const int64_t chunks = (s / (per * W)) * W >= 4 * k ? s / (per * W) : 0;
  g->per = per;
  g->chunks = chunks;
  const T inv = T(1) / total;
  const V minus_one = T(-1) - V{};
  for (int64_t c = 0; c < chunks; ++c) {
    T* wc = w + c * per * W;
    V best = minus_one;
    for (int64_t i = 0; i < per * W; i += W) {
      const V v = load_vec<V>(wc + i) * inv;
      store_vec(wc + i, v);
      V r = v;
      if constexpr (kMasked) r = load_vec<V>(allowed + c * per * W + i) != T(0) ? v : minus_one;
      best = best > r ? best : r;
    }
    store_vec(maxima + c * W, best);
  }
  const int64_t done = chunks * per * W, done_v = done + (sv - done) / W * W;
  for (int64_t t = done; t < done_v; t += W) store_vec(w + t, load_vec<V>(w + t) * inv);
  for (int64_t t = done_v; t < s; ++t) w[t] *= inv;
}

template <typename T, int VB>
FCA_INLINE void softmax_row_body(const T* x, const T* allowed, int64_t s, int64_t k, T* w, T* maxima, Groups* g) {
  if (allowed == nullptr) return softmax_row_impl<T, VB, false>(x, allowed, s, k, w, maxima, g);
  softmax_row_impl<T, VB, true>(x, allowed, s, k, w, maxima, g);
}
FCA_MULTIVERSION(softmax_row)

// Top k of one row of weights w in the order of `before` (padded keys ranked at -1), written to
// out, best first. With group maxima (g.chunks > 0), the k-th largest group maximum bounds the
// k-th largest value from below (k groups, hence k entries, reach it), and only the groups whose
// maximum reaches the bound are scanned for candidates: every entry at or above the bound, ties
// included, so the result is exact. The candidates (about k) are then selected and sorted.
template <typename T, int VB>
FCA_INLINE void select_row_variants_body(const T* w, const T* allowed, int64_t s, int64_t k, const T* maxima,
                                         const Groups* g, Entry<T>* buf, T* sorted, int64_t* out) {
  auto value = [&](int64_t t) { return allowed != nullptr && allowed[t] == T(0) ? T(-1) : w[t]; };
  auto order = [](const Entry<T>& a, const Entry<T>& b) { return before(a, b); };
  if (!g->finite) {  // NaN row: the real keys in index order, then the padded ones
    int64_t n = 0;
    for (int64_t t = 0; t < s && n < k; ++t)
      if (allowed == nullptr || allowed[t] != T(0)) out[n++] = t;
    for (int64_t t = 0; t < s && n < k; ++t)
      if (allowed != nullptr && allowed[t] == T(0)) out[n++] = t;
    return;
  }
  int64_t n = 0;
  if (g->chunks == 0) {
    for (int64_t t = 0; t < s; ++t) buf[t] = Entry<T>{value(t), t};
    n = s;
  } else {
    const int64_t lanes = g->lanes, per = g->per, groups = g->chunks * lanes;
    std::copy(maxima, maxima + groups, sorted);
    std::nth_element(sorted, sorted + (k - 1), sorted + groups, [](T a, T b) { return a > b; });
    const T bound = sorted[k - 1];
    for (int64_t gi = 0; gi < groups; ++gi) {
      if (maxima[gi] < bound) continue;
      const int64_t first = (gi / lanes) * per * lanes + gi % lanes;
      for (int64_t x = 0; x < per; ++x) {
        const int64_t t = first + x * lanes;
        const T v = value(t);
        buf[n] = Entry<T>{v, t};
        n += v >= bound;
      }
    }
    for (int64_t t = g->chunks * per * lanes; t < s; ++t) {  // the tail after the last whole chunk
      const T v = value(t);
      buf[n] = Entry<T>{v, t};
      n += v >= bound;
    }
  }
  std::nth_element(buf, buf + (k - 1), buf + n, order);
  std::sort(buf, buf + k, order);
  for (int64_t i = 0; i < k; ++i) out[i] = buf[i].index;
}
FCA_MULTIVERSION(select_row_variants)

// GCC 12's AVX-512 build of this branchy routine measured up to 3x slower than its AVX2 build on
// this project's machine (wide permutes around the scalar bookkeeping), so AVX-512 CPUs run the
// AVX2 variant. (Its vector width does not matter: the group layout comes with the maxima.)
template <typename T, typename... A>
void select_row(A... a) {
  if (cpu_isa() == Isa::kDefault) return select_row_variants_default<T, A...>(a...);
  return select_row_variants_avx2<T, A...>(a...);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> softmax_topk_cpu(const at::Tensor& scores_in,
                                                    const std::optional<at::Tensor>& key_padding_mask,
                                                    int64_t topk) {
  check_dim(scores_in, 4, "scores", "(N, H, C, S)");
  check_float(scores_in, "scores");
  TORCH_CHECK(topk >= 1, "topk must be >= 1, got ", topk);
  const int64_t n = scores_in.size(0), h = scores_in.size(1), c = scores_in.size(2), s = scores_in.size(3);
  TORCH_CHECK(s >= 1, "scores need at least one key, got S = 0");
  const int64_t k = std::min(topk, s);
  at::Tensor padded;
  if (key_padding_mask.has_value()) {
    padded = key_padding_mask->contiguous();
    TORCH_CHECK(padded.scalar_type() == at::kBool, "key_padding_mask must be bool, got ", padded.scalar_type());
    TORCH_CHECK(padded.dim() == 2 && padded.size(0) == n && padded.size(1) == s,
                "key_padding_mask must have shape (N, S) = (", n, ", ", s, "), got ", padded.sizes());
    check_same_device(scores_in, padded, "scores", "key_padding_mask");
  }
  const at::Tensor scores = scores_in.contiguous();
  at::Tensor attn = at::empty_like(scores, at::MemoryFormat::Contiguous);
  at::Tensor top = at::empty({n, h, c, k}, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "softmax_topk", [&] {
    const scalar_t* x = scores.const_data_ptr<scalar_t>();
    scalar_t* a = attn.mutable_data_ptr<scalar_t>();
    int64_t* out = top.mutable_data_ptr<int64_t>();
    std::vector<scalar_t> allowed;  // (N, S): 1 real key, 0 padded
    if (key_padding_mask.has_value()) {
      const bool* p = padded.const_data_ptr<bool>();
      allowed.resize(n * s);
      for (int64_t i = 0; i < n * s; ++i) allowed[i] = p[i] ? scalar_t(0) : scalar_t(1);
    }
    at::parallel_for(0, n * h * c, grain_for(4 * s), [&](int64_t begin, int64_t end) {
      std::vector<Entry<scalar_t>> buf(s);
      std::vector<scalar_t> maxima(2 * s + kMaxLanes<scalar_t>);  // group maxima and their sorted copy
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* al = allowed.empty() ? nullptr : allowed.data() + (row / (h * c)) * s;
        Groups g;
        softmax_row<scalar_t>(x + row * s, al, s, k, a + row * s, maxima.data(), &g);
        select_row<scalar_t>(static_cast<const scalar_t*>(a + row * s), al, s, k,
                             static_cast<const scalar_t*>(maxima.data()), static_cast<const Groups*>(&g), buf.data(),
                             maxima.data() + s, out + row * k);
      }
    });
  });
  return {attn, top};
}

// ---------------------------------------------------------------------------------------------
// What i-clustered attention takes from the centroid attention besides its top-k sets:
//
//   topk_rest  mass_j = sum_{t in T_j} A_jt  and  rest_j = sum_{t not in T_j} A_jt v_t,
//              rest as A V (one GEMM) minus the k top terms of each row, with no masked copy of A
//              and no gathered (C, k, M) values;
//   its backward  dA_jt = g_rest_j . v_t for t not in T_j and g_mass_j for t in T_j (the top terms
//              cancel in rest), dv = A^T g_rest minus the top terms, per head in cluster order
//              (deterministic);
//   softmax_backward  dx = A (dA - sum_t dA_t A_t), one pass per row instead of four ATen ops.
//
// A key listed twice in a row of top counts twice, forward and backward alike (softmax_topk never
// lists one twice).

namespace {

struct RestShapes {
  int64_t n, h, c, s, k, m;
};

RestShapes check_rest_inputs(const at::Tensor& attn, const at::Tensor& top, const at::Tensor& v) {
  check_dim(attn, 4, "attn", "(N, H, C, S)");
  check_float(attn, "attn");
  check_dim(top, 4, "top", "(N, H, C, topk)");
  check_index(top, "top");
  check_dim(v, 4, "v", "(N, H, S, M)");
  TORCH_CHECK(v.scalar_type() == attn.scalar_type(), "v must have the dtype of attn (", attn.scalar_type(), "), got ",
              v.scalar_type());
  check_same_device(attn, top, "attn", "top");
  check_same_device(attn, v, "attn", "v");
  const RestShapes sh{attn.size(0), attn.size(1), attn.size(2), attn.size(3), top.size(3), v.size(3)};
  TORCH_CHECK(top.size(0) == sh.n && top.size(1) == sh.h && top.size(2) == sh.c,
              "top must have shape (N, H, C, topk) = (", sh.n, ", ", sh.h, ", ", sh.c, ", topk), got ", top.sizes());
  TORCH_CHECK(v.size(0) == sh.n && v.size(1) == sh.h && v.size(2) == sh.s, "v must have shape (N, H, S, M) = (", sh.n,
              ", ", sh.h, ", ", sh.s, ", M), got ", v.sizes());
  return sh;
}

inline int64_t checked_key(int64_t t, int64_t s) {
  TORCH_CHECK(t >= 0 && t < s, "top holds key index ", t, " outside 0..S-1 = 0..", s - 1);
  return t;
}

// One row j of the backward: for each t in top (already checked), dA_jt += g_mass - g . v_t and
// dv_t -= A_jt g, g = g_rest_j (m features).
template <typename T, int VB>
FCA_INLINE void rest_backward_row_body(const T* g, T gm, const T* arow, const int64_t* top, int64_t k, const T* vh,
                                       int64_t m, T* garow, T* gvh) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t W = Vec<T, VB>::size;
  const int64_t mv = m / W * W;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t t = top[i];
    const T w = arow[t];
    const T* vt = vh + t * m;
    T* gvt = gvh + t * m;
    V acc = V{};
    for (int64_t x = 0; x < mv; x += W) {
      const V gx = load_vec<V>(g + x);
      acc += gx * load_vec<V>(vt + x);
      store_vec(gvt + x, load_vec<V>(gvt + x) - w * gx);
    }
    T dot = hsum<T>(acc);
    for (int64_t x = mv; x < m; ++x) {
      dot += g[x] * vt[x];
      gvt[x] -= w * g[x];
    }
    garow[t] += gm - dot;
  }
}
FCA_MULTIVERSION(rest_backward_row)

// o = a (g - g . a) over one row of s entries.
template <typename T, int VB>
FCA_INLINE void softmax_backward_row_body(const T* g, const T* a, int64_t s, T* o) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t W = Vec<T, VB>::size;
  const int64_t sv = s / W * W;
  V acc0 = V{}, acc1 = V{};
  int64_t t = 0;
  for (; t + 2 * W <= sv; t += 2 * W) {
    acc0 += load_vec<V>(g + t) * load_vec<V>(a + t);
    acc1 += load_vec<V>(g + t + W) * load_vec<V>(a + t + W);
  }
  for (; t < sv; t += W) acc0 += load_vec<V>(g + t) * load_vec<V>(a + t);
  T dot = hsum<T>(acc0 + acc1);
  for (; t < s; ++t) dot += g[t] * a[t];
  for (t = 0; t < sv; t += W) store_vec(o + t, load_vec<V>(a + t) * (load_vec<V>(g + t) - dot));
  for (; t < s; ++t) o[t] = a[t] * (g[t] - dot);
}
FCA_MULTIVERSION(softmax_backward_row)

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_rest_cpu(const at::Tensor& attn_in, const at::Tensor& top_in,
                                                 const at::Tensor& v_in) {
  const RestShapes sh = check_rest_inputs(attn_in, top_in, v_in);
  const at::Tensor attn = attn_in.contiguous(), top = top_in.contiguous(), v = v_in.contiguous();
  at::Tensor rest = at::matmul(attn, v).contiguous();  // (N, H, C, M)
  at::Tensor mass = at::empty({sh.n, sh.h, sh.c}, attn.options());
  AT_DISPATCH_FLOATING_TYPES(attn.scalar_type(), "topk_rest", [&] {
    const scalar_t* a = attn.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const int64_t* tp = top.const_data_ptr<int64_t>();
    scalar_t* rp = rest.mutable_data_ptr<scalar_t>();
    scalar_t* mp = mass.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, sh.n * sh.h * sh.c, grain_for(sh.k * sh.m), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* ar = a + row * sh.s;
        const scalar_t* vh = vp + (row / sh.c) * sh.s * sh.m;
        scalar_t* out = rp + row * sh.m;
        scalar_t sum = 0;
        for (int64_t i = 0; i < sh.k; ++i) {
          const int64_t t = checked_key(tp[row * sh.k + i], sh.s);
          const scalar_t w = ar[t];
          sum += w;
          const scalar_t* vt = vh + t * sh.m;
          for (int64_t x = 0; x < sh.m; ++x) out[x] -= w * vt[x];
        }
        mp[row] = sum;
      }
    });
  });
  return {mass, rest};
}

std::tuple<at::Tensor, at::Tensor> topk_rest_backward_cpu(const at::Tensor& grad_mass_in,
                                                          const at::Tensor& grad_rest_in, const at::Tensor& attn_in,
                                                          const at::Tensor& top_in, const at::Tensor& v_in) {
  const RestShapes sh = check_rest_inputs(attn_in, top_in, v_in);
  TORCH_CHECK(grad_mass_in.sizes() == at::IntArrayRef({sh.n, sh.h, sh.c}) &&
                  grad_mass_in.scalar_type() == attn_in.scalar_type(),
              "grad_mass must have shape (N, H, C) and the dtype of attn, got ", grad_mass_in.sizes(), " ",
              grad_mass_in.scalar_type());
  TORCH_CHECK(grad_rest_in.sizes() == at::IntArrayRef({sh.n, sh.h, sh.c, sh.m}) &&
                  grad_rest_in.scalar_type() == attn_in.scalar_type(),
              "grad_rest must have shape (N, H, C, M) and the dtype of attn, got ", grad_rest_in.sizes(), " ",
              grad_rest_in.scalar_type());
  const at::Tensor attn = attn_in.contiguous(), top = top_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_mass = grad_mass_in.contiguous(), grad_rest = grad_rest_in.contiguous();
  at::Tensor grad_attn = at::matmul(grad_rest, v.transpose(-1, -2)).contiguous();  // (N, H, C, S)
  at::Tensor grad_v = at::matmul(attn.transpose(-1, -2), grad_rest).contiguous();  // (N, H, S, M)
  AT_DISPATCH_FLOATING_TYPES(attn.scalar_type(), "topk_rest_backward", [&] {
    const scalar_t* a = attn.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const int64_t* tp = top.const_data_ptr<int64_t>();
    const scalar_t* gm = grad_mass.const_data_ptr<scalar_t>();
    const scalar_t* gr = grad_rest.const_data_ptr<scalar_t>();
    scalar_t* ga = grad_attn.mutable_data_ptr<scalar_t>();
    scalar_t* gv = grad_v.mutable_data_ptr<scalar_t>();
    // One head per task: its rows add into shared value rows, in row order.
    at::parallel_for(0, sh.n * sh.h, grain_for(sh.c * sh.k * sh.m), [&](int64_t begin, int64_t end) {
      for (int64_t head = begin; head < end; ++head) {
        const scalar_t* vh = vp + head * sh.s * sh.m;
        scalar_t* gvh = gv + head * sh.s * sh.m;
        for (int64_t row = head * sh.c; row < (head + 1) * sh.c; ++row) {
          const int64_t* tr = tp + row * sh.k;
          for (int64_t i = 0; i < sh.k; ++i) checked_key(tr[i], sh.s);
          rest_backward_row<scalar_t>(gr + row * sh.m, gm[row], a + row * sh.s, tr, sh.k, vh, sh.m,
                                      ga + row * sh.s, gvh);
        }
      }
    });
  });
  return {grad_attn, grad_v};
}

at::Tensor softmax_backward_cpu(const at::Tensor& grad_in, const at::Tensor& attn_in) {
  check_float(attn_in, "attn");
  TORCH_CHECK(attn_in.dim() >= 1 && attn_in.size(-1) >= 1, "attn must have at least one key, got ", attn_in.sizes());
  TORCH_CHECK(grad_in.sizes() == attn_in.sizes() && grad_in.scalar_type() == attn_in.scalar_type(),
              "grad must have the shape and dtype of attn ", attn_in.sizes(), " ", attn_in.scalar_type(), ", got ",
              grad_in.sizes(), " ", grad_in.scalar_type());
  check_same_device(grad_in, attn_in, "grad", "attn");
  const at::Tensor grad = grad_in.contiguous(), attn = attn_in.contiguous();
  at::Tensor out = at::empty_like(attn, at::MemoryFormat::Contiguous);
  const int64_t s = attn.size(-1), rows = attn.numel() / s;
  AT_DISPATCH_FLOATING_TYPES(attn.scalar_type(), "softmax_backward", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* a = attn.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(3 * s), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        softmax_backward_row<scalar_t>(g + r * s, a + r * s, s, o + r * s);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// centroid_topk(centroids, k, v, key_padding_mask, topk, scale) -> (top, mass, rest): softmax_topk
// of the scores scale * centroids K^T, then topk_rest, in one pass for inference (no gradient).
// Per (n, h) and block of centroid rows: the block's scores go into a per-thread scratch block (a
// BLAS GEMM), become weights and top-k sets in place (the row routines of softmax_topk: the same
// ties, padding and NaN rows), and are multiplied with V (a second GEMM) before the next block; the
// k top terms are then taken off rest. No (N, H, C, S) tensor is written: at S = 8k the scores and
// the weights were two fresh 13 MB tensors a call (page faults), written and read three times; the
// scratch block is reused and stays in the last-level cache.

namespace {

// Centroid rows per block. A block is a whole head up to kBlockBytes: each GEMM call packs all of K
// or V (S rows) again, so small blocks cost more than their better cache locality saves (measured
// on a Zen 3 EPYC at S = 8k, C = 100, H = 4: 128 kB blocks 15.8 + 11.6 ms of GEMM CPU time a call, whole
// heads 6.8 + 5.5).
// Heads are split further only when there are fewer of them than threads.
constexpr int64_t kBlockBytes = 4 << 20;

int64_t block_rows(int64_t heads, int64_t c, int64_t row_bytes) {
  int64_t rows = std::clamp<int64_t>(kBlockBytes / row_bytes, 1, std::max<int64_t>(c, 1));
  const int64_t threads = at::get_num_threads();
  if (heads * ((c + rows - 1) / rows) < threads) {
    const int64_t per_head = (threads + heads - 1) / heads;
    rows = std::max<int64_t>(1, (c + per_head - 1) / per_head);
  }
  return rows;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> centroid_topk_cpu(const at::Tensor& centroids_in,
                                                                 const at::Tensor& k_in, const at::Tensor& v_in,
                                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                                 int64_t topk, double scale) {
  check_dim(centroids_in, 4, "centroids", "(N, H, C, E)");
  check_float(centroids_in, "centroids");
  check_dim(k_in, 4, "k", "(N, H, S, E)");
  check_dim(v_in, 4, "v", "(N, H, S, M)");
  TORCH_CHECK(k_in.scalar_type() == centroids_in.scalar_type() && v_in.scalar_type() == centroids_in.scalar_type(),
              "centroids, k and v must share one dtype, got ", centroids_in.scalar_type(), ", ", k_in.scalar_type(),
              ", ", v_in.scalar_type());
  check_same_device(centroids_in, k_in, "centroids", "k");
  check_same_device(centroids_in, v_in, "centroids", "v");
  TORCH_CHECK(topk >= 1, "topk must be >= 1, got ", topk);
  const int64_t n = centroids_in.size(0), h = centroids_in.size(1), c = centroids_in.size(2);
  const int64_t e = centroids_in.size(3), s = k_in.size(2), m = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == n && k_in.size(1) == h && k_in.size(3) == e, "k must have shape (N, H, S, E) = (", n,
              ", ", h, ", S, ", e, "), got ", k_in.sizes());
  TORCH_CHECK(v_in.size(0) == n && v_in.size(1) == h && v_in.size(2) == s, "v must have shape (N, H, S, M) = (", n,
              ", ", h, ", ", s, ", M), got ", v_in.sizes());
  TORCH_CHECK(s >= 1, "k needs at least one key, got S = 0");
  at::Tensor padded;
  if (key_padding_mask.has_value()) {
    padded = key_padding_mask->contiguous();
    TORCH_CHECK(padded.scalar_type() == at::kBool, "key_padding_mask must be bool, got ", padded.scalar_type());
    TORCH_CHECK(padded.dim() == 2 && padded.size(0) == n && padded.size(1) == s,
                "key_padding_mask must have shape (N, S) = (", n, ", ", s, "), got ", padded.sizes());
    check_same_device(centroids_in, padded, "centroids", "key_padding_mask");
  }
  const int64_t kk = std::min(topk, s);
  const at::Tensor centroids = centroids_in.contiguous(), key = k_in.contiguous(), value = v_in.contiguous();
  at::Tensor top = at::empty({n, h, c, kk}, centroids.options().dtype(at::kLong));
  at::Tensor mass = at::empty({n, h, c}, centroids.options());
  at::Tensor rest = at::empty({n, h, c, m}, centroids.options());
  AT_DISPATCH_FLOATING_TYPES(centroids.scalar_type(), "centroid_topk", [&] {
    using T = scalar_t;
    const int64_t rows = block_rows(n * h, c, s * static_cast<int64_t>(sizeof(T)));
    const int64_t blocks = (c + rows - 1) / rows;
    const T* cp = centroids.const_data_ptr<T>();
    const T* kp = key.const_data_ptr<T>();
    const T* vp = value.const_data_ptr<T>();
    int64_t* out = top.mutable_data_ptr<int64_t>();
    T* mp = mass.mutable_data_ptr<T>();
    T* rp = rest.mutable_data_ptr<T>();
    std::vector<T> allowed;  // (N, S): 1 real key, 0 padded
    if (key_padding_mask.has_value()) {
      const bool* p = padded.const_data_ptr<bool>();
      allowed.resize(n * s);
      for (int64_t i = 0; i < n * s; ++i) allowed[i] = p[i] ? T(0) : T(1);
    }
    at::parallel_for(0, n * h * blocks, grain_for(rows * s * (e + m)), [&](int64_t begin, int64_t end) {
      std::vector<T> block(rows * s), scaled(rows * e), maxima(2 * s + kMaxLanes<T>);
      std::vector<Entry<T>> buf(s);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t head = task / blocks, r0 = (task % blocks) * rows, nr = std::min(rows, c - r0);
        const int64_t first = head * c + r0;  // the block's first row of (N * H * C)
        const T* al = allowed.empty() ? nullptr : allowed.data() + (head / h) * s;
        const T* kh = kp + head * s * e;
        const T* vh = vp + head * s * m;
        for (int64_t i = 0; i < nr * e; ++i) scaled[i] = cp[first * e + i] * static_cast<T>(scale);
        gemm_rows<T>(true, nr, s, e, scaled.data(), e, kh, e, T(0), block.data(), s);  // (nr, S) scores
        for (int64_t r = 0; r < nr; ++r) {
          T* w = block.data() + r * s;  // the scores become the weights, in place
          int64_t* tr = out + (first + r) * kk;
          Groups g;
          softmax_row<T>(static_cast<const T*>(w), al, s, kk, w, maxima.data(), &g);
          select_row<T>(static_cast<const T*>(w), al, s, kk, static_cast<const T*>(maxima.data()),
                        static_cast<const Groups*>(&g), buf.data(), maxima.data() + s, tr);
          T sum = 0;
          for (int64_t i = 0; i < kk; ++i) sum += w[tr[i]];
          mp[first + r] = sum;
        }
        T* rb = rp + first * m;
        gemm_rows<T>(false, nr, m, s, block.data(), s, vh, m, T(0), rb, m);  // (nr, M) = A V
        for (int64_t r = 0; r < nr; ++r) {  // minus the k top terms: the rest
          const T* w = block.data() + r * s;
          const int64_t* tr = out + (first + r) * kk;
          T* o = rb + r * m;
          for (int64_t i = 0; i < kk; ++i) {
            const T wt = w[tr[i]];
            const T* vt = vh + tr[i] * m;
            for (int64_t x = 0; x < m; ++x) o[x] -= wt * vt[x];
          }
        }
      }
    });
  });
  return {top, mass, rest};
}

TORCH_LIBRARY_IMPL(fairseq_clustered, CPU, m) {
  m.impl("centroid_topk", &centroid_topk_cpu);
  m.impl("softmax_topk", &softmax_topk_cpu);
  m.impl("topk_rest", &topk_rest_cpu);
  m.impl("topk_rest_backward", &topk_rest_backward_cpu);
  m.impl("softmax_backward", &softmax_backward_cpu);
}

}  // namespace fca
