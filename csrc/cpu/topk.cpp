// Centroid attention with per-cluster top-k selection (DESIGN.md §2, i-clustered).
//
// softmax_topk(scores, key_padding_mask, topk) -> (attn, top): attn = softmax over the keys of
// the (already scaled) centroid scores with padded keys at weight 0, in float32 (float64 for
// float64 input); top = the min(topk, S) keys of each row ranked by attn, descending, ties to the
// lower key index, every padded key ranked below every real key. The softmax is ATen's
// vectorised kernel; the selection bounds the k-th value with block maxima and sorts only the
// few candidates that reach the bound, instead of sorting rows.
#include "cpu_common.h"

#include <torch/library.h>

#include <algorithm>
#include <functional>
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

// Top k of one row in the order of `before`, written to out, best first. Rows much longer than k
// take two passes: the maxima of blocks of W entries give a lower bound on the k-th largest value
// (the k-th largest block maximum: k blocks, hence k entries, reach it), and only the blocks whose
// maximum reaches that bound are scanned for candidates; the candidates (about k, more with ties)
// are then selected and sorted. Short rows are selected and sorted whole.
template <typename T, int VB>
FCA_INLINE void select_row_variants_body(const T* attn, const bool* padded, int64_t s, int64_t k, Entry<T>* buf,
                                T* maxima, int64_t* out) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t W = Vec<T, VB>::size;
  auto value = [&](int64_t t) { return padded != nullptr && padded[t] ? T(-1) : attn[t]; };
  auto order = [](const Entry<T>& a, const Entry<T>& b) { return before(a, b); };
  // Blocks of `width` entries (a multiple of W, up to 8 vectors), at least 4k of them.
  int64_t width = W;
  while (width < 8 * W && s / (2 * width) >= 4 * k) width *= 2;
  const int64_t blocks = s / width;
  int64_t n = 0;
  if (blocks < 4 * k) {
    for (int64_t t = 0; t < s; ++t) buf[t] = Entry<T>{value(t), t};
    n = s;
  } else {
    T* sorted = maxima + blocks;
    const V minus_one = T(-1) - V{};
    for (int64_t b = 0; b < blocks; ++b) {
      V m = load_vec<V>(attn + b * width);
      for (int64_t x = 0; x < width; x += W) {
        V v = load_vec<V>(attn + b * width + x);
        if (padded != nullptr) {
          V p;
          for (int64_t w = 0; w < W; ++w) p[w] = padded[b * width + x + w] ? T(1) : T(0);
          v = p != T(0) ? minus_one : v;
        }
        m = x == 0 ? v : (v > m ? v : m);
      }
      T lanes[W];
      __builtin_memcpy(lanes, &m, sizeof(V));
      T best = lanes[0];
      for (int64_t w = 1; w < W; ++w) best = lanes[w] > best ? lanes[w] : best;
      maxima[b] = best;
    }
    std::copy(maxima, maxima + blocks, sorted);
    std::nth_element(sorted, sorted + (k - 1), sorted + blocks, [](T a, T b) { return a > b; });
    const T bound = sorted[k - 1];
    for (int64_t b = 0; b < blocks; ++b) {
      if (maxima[b] < bound) continue;
      for (int64_t t = b * width; t < (b + 1) * width; ++t) {
        const T v = value(t);
        if (v >= bound) buf[n++] = Entry<T>{v, t};
      }
    }
    for (int64_t t = blocks * width; t < s; ++t) {  // the tail after the last whole block
      const T v = value(t);
      if (v >= bound) buf[n++] = Entry<T>{v, t};
    }
  }
  std::nth_element(buf, buf + (k - 1), buf + n, order);
  std::sort(buf, buf + k, order);
  for (int64_t i = 0; i < k; ++i) out[i] = buf[i].index;
}
FCA_MULTIVERSION(select_row_variants)

// GCC 12's AVX-512 build of this branchy routine measured up to 3x slower than its AVX2 build on
// this project's machine (wide permutes around the scalar bookkeeping), so AVX-512 CPUs run the
// AVX2 variant.
template <typename T, typename... A>
void select_row(A... a) {
  if (cpu_isa() == Isa::kDefault) return select_row_variants_default<T, A...>(a...);
  return select_row_variants_avx2<T, A...>(a...);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> softmax_topk_cpu(const at::Tensor& scores,
                                                    const std::optional<at::Tensor>& key_padding_mask,
                                                    int64_t topk) {
  check_dim(scores, 4, "scores", "(N, H, C, S)");
  check_float(scores, "scores");
  TORCH_CHECK(topk >= 1, "topk must be >= 1, got ", topk);
  const int64_t n = scores.size(0), h = scores.size(1), c = scores.size(2), s = scores.size(3);
  TORCH_CHECK(s >= 1, "scores need at least one key, got S = 0");
  const int64_t k = std::min(topk, s);
  at::Tensor masked = scores;
  at::Tensor padded;
  if (key_padding_mask.has_value()) {
    padded = key_padding_mask->contiguous();
    TORCH_CHECK(padded.scalar_type() == at::kBool, "key_padding_mask must be bool, got ", padded.scalar_type());
    TORCH_CHECK(padded.dim() == 2 && padded.size(0) == n && padded.size(1) == s,
                "key_padding_mask must have shape (N, S) = (", n, ", ", s, "), got ", padded.sizes());
    check_same_device(scores, padded, "scores", "key_padding_mask");
    masked = scores.masked_fill(padded.view({n, 1, 1, s}), -std::numeric_limits<double>::infinity());
  }
  const at::Tensor attn = at::softmax(masked, -1, at::promote_types(scores.scalar_type(), at::kFloat)).contiguous();
  at::Tensor top = at::empty({n, h, c, k}, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(attn.scalar_type(), "softmax_topk", [&] {
    const scalar_t* a = attn.const_data_ptr<scalar_t>();
    const bool* pad = key_padding_mask.has_value() ? padded.const_data_ptr<bool>() : nullptr;
    int64_t* out = top.mutable_data_ptr<int64_t>();
    at::parallel_for(0, n * h * c, grain_for(2 * s), [&](int64_t begin, int64_t end) {
      std::vector<Entry<scalar_t>> buf(s);
      std::vector<scalar_t> maxima(2 * s + 2);  // block maxima and their sorted copy (blocks <= s)
      for (int64_t row = begin; row < end; ++row)
        select_row<scalar_t>(a + row * s, pad == nullptr ? nullptr : pad + (row / (h * c)) * s, s, k, buf.data(),
                             maxima.data(), out + row * k);
    });
  });
  return {attn, top};
}

TORCH_LIBRARY_IMPL(fairseq_clustered, CPU, m) { m.impl("softmax_topk", &softmax_topk_cpu); }

}  // namespace fca
