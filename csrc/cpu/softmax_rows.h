// The row routines of the centroid attention (DESIGN.md §2, i-clustered): a row's softmax over the
// keys with padded keys at weight 0, the selection of its top k, and its backward. Used by the
// operators of centroid.cpp only.
//
// One fused pass per row: the row max, then exp and the sum, then the normalisation, which also
// records group maxima of the ranking values; the selection then bounds the k-th value with those
// maxima and sorts only the few candidates that reach the bound. The selection ranks the weights
// (not the scores): two scores that round to one weight tie, and go to the lower index. A row
// whose softmax is not finite (a NaN or infinite score at a real key, or no real key at all) comes
// out all NaN, like ATen's softmax, and its top is its real keys in index order, then its padded
// ones: always valid, distinct key indices.
#pragma once

#include "cpu_common.h"

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
}  // namespace fca
