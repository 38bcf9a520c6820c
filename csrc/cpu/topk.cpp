// Centroid attention with per-cluster top-k selection (DESIGN.md §2, i-clustered).
//
// softmax_topk(scores, key_padding_mask, topk) -> (attn, top): attn = softmax over the keys of
// the (already scaled) centroid scores with padded keys at weight 0, in float32 (float64 for
// float64 input); top = the min(topk, S) keys of each row ranked by attn, descending, ties to the
// lower key index, every padded key ranked below every real key. The softmax is ATen's
// vectorised kernel; the selection is one pass per row with a size-k heap, instead of sorting.
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

// Heap whose root is the worst kept entry (the one every candidate must beat).
template <typename T>
void sift_down(Entry<T>* heap, int64_t size, int64_t i) {
  while (true) {
    int64_t worst = i;
    const int64_t l = 2 * i + 1, r = l + 1;
    if (l < size && before(heap[worst], heap[l])) worst = l;
    if (r < size && before(heap[worst], heap[r])) worst = r;
    if (worst == i) return;
    std::swap(heap[i], heap[worst]);
    i = worst;
  }
}

template <typename T>
void select_row(const T* attn, const bool* padded, int64_t s, int64_t k, Entry<T>* heap, int64_t* out) {
  auto value = [&](int64_t t) { return padded != nullptr && padded[t] ? T(-1) : attn[t]; };
  for (int64_t t = 0; t < k; ++t) heap[t] = Entry<T>{value(t), t};
  for (int64_t i = k / 2 - 1; i >= 0; --i) sift_down(heap, k, i);
  auto offer = [&](int64_t t) {
    const T v = value(t);
    if (v > heap[0].value) {  // equal values lose: their index is higher than every kept one's
      heap[0] = Entry<T>{v, t};
      sift_down(heap, k, 0);
    }
  };
  // Once the heap holds good keys most blocks have no candidate: test 16 at a time first.
  constexpr int64_t B = 16;
  int64_t t = k;
  for (; t + B <= s; t += B) {
    const T threshold = heap[0].value;
    int32_t above = 0;
    if (padded == nullptr) {
      for (int64_t w = 0; w < B; ++w) above += attn[t + w] > threshold;
    } else {
      for (int64_t w = 0; w < B; ++w) above += (padded[t + w] ? T(-1) : attn[t + w]) > threshold;
    }
    if (above != 0)
      for (int64_t w = 0; w < B; ++w) offer(t + w);
  }
  for (; t < s; ++t) offer(t);
  std::sort(heap, heap + k, [](const Entry<T>& a, const Entry<T>& b) { return before(a, b); });
  for (int64_t i = 0; i < k; ++i) out[i] = heap[i].index;
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
    at::parallel_for(0, n * h * c, 4, [&](int64_t begin, int64_t end) {
      std::vector<Entry<scalar_t>> heap(k);
      for (int64_t row = begin; row < end; ++row)
        select_row<scalar_t>(a + row * s, pad == nullptr ? nullptr : pad + (row / (h * c)) * s, s, k, heap.data(),
                             out + row * k);
    });
  });
  return {attn, top};
}

TORCH_LIBRARY_IMPL(fairseq_clustered, CPU, m) { m.impl("softmax_topk", &softmax_topk_cpu); }

}  // namespace fca
