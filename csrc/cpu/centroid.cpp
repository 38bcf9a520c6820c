// Centroid attention with per-cluster top-k selection (DESIGN.md §2, i-clustered): the centroid
// scores' softmax A (C, S) per (n, h), each row's top-k keys T_j, and what i-clustered attention takes
// from it besides them, m̂_j = sum_{t in T_j} A_jt and rest_j = sum_{t not in T_j} A_jt v_t.
//
//   softmax_topk(scores, key_padding_mask, topk) -> (attn, top): from given (scaled) scores; attn in
//       float32 (float64 for float64 input), top the min(topk, S) keys of each row ranked by attn,
//       descending, ties to the lower key index, every padded key below every real key (row
//       routines: softmax_rows.h).
//   centroid_attention(centroids, k, v, key_padding_mask, topk, scale) -> (attn, top, mass, rest):
//       the same from the centroids, for training; rest as A V (a GEMM) minus the k top terms of
//       each row, with no masked copy of A and no gathered values. topk = 0: no top-k set, mass 0
//       and rest = A V, the per-cluster values of clustered attention.
//   centroid_attention_backward: the gradients of centroids, k and v from those of mass and rest;
//       per (n, h): dA = g_rest V^T with the top entries set to g_mass (the top terms cancel in
//       rest), the softmax's backward in place, then d centroids = scale dS K, dk = scale dS^T C and
//       dv = A^T g_rest minus the top terms, accumulated over the blocks of a head in order
//       (deterministic).
//   centroid_topk(centroids, k, v, key_padding_mask, topk, scale) -> (top, mass, rest): for
//       inference; the scores and weights stay in a per-thread block, no (C, S) tensor is written.
//
// Per (n, h) and block of centroid rows, the scores are one BLAS GEMM into the block (attn's own
// rows, or the per-thread block), the row routines turn them into weights and top-k sets in place
// while the block is in cache, and a second GEMM multiplies it with V. At S = 8k the unfused
// operators wrote and read two fresh 13 MB (C, S) tensors a call (scores, then attn).
#include "softmax_rows.h"

#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fca {
namespace {

// The key padding mask, checked: (N, S) bool on the device of `like`, contiguous (undefined: none).
at::Tensor checked_key_padding(const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& like, int64_t n,
                               int64_t s) {
  if (!key_padding_mask.has_value()) return at::Tensor();
  at::Tensor padded = key_padding_mask->contiguous();
  TORCH_CHECK(padded.scalar_type() == at::kBool, "key_padding_mask must be bool, got ", padded.scalar_type());
  TORCH_CHECK(padded.dim() == 2 && padded.size(0) == n && padded.size(1) == s,
              "key_padding_mask must have shape (N, S) = (", n, ", ", s, "), got ", padded.sizes());
  check_same_device(like, padded, "the inputs", "key_padding_mask");
  return padded;
}

// (N, S): 1 for a real key, 0 for a padded one, as the row routines take it (empty: no padding).
template <typename T>
std::vector<T> allowed_keys(const at::Tensor& padded, int64_t n, int64_t s) {
  std::vector<T> allowed;
  if (!padded.defined()) return allowed;
  const bool* p = padded.const_data_ptr<bool>();
  allowed.resize(n * s);
  for (int64_t i = 0; i < n * s; ++i) allowed[i] = p[i] ? T(0) : T(1);
  return allowed;
}

inline int64_t checked_key(int64_t t, int64_t s) {
  TORCH_CHECK(t >= 0 && t < s, "top holds key index ", t, " outside 0..S-1 = 0..", s - 1);
  return t;
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
  const at::Tensor padded = checked_key_padding(key_padding_mask, scores_in, n, s);
  const at::Tensor scores = scores_in.contiguous();
  at::Tensor attn = at::empty_like(scores, at::MemoryFormat::Contiguous);
  at::Tensor top = at::empty({n, h, c, k}, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "softmax_topk", [&] {
    const scalar_t* x = scores.const_data_ptr<scalar_t>();
    scalar_t* a = attn.mutable_data_ptr<scalar_t>();
    int64_t* out = top.mutable_data_ptr<int64_t>();
    const std::vector<scalar_t> allowed = allowed_keys<scalar_t>(padded, n, s);
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

namespace {

struct Shapes {
  int64_t n, h, c, e, s, m, k;  // k: min(topk, S)
};

Shapes check_centroid_inputs(const at::Tensor& centroids, const at::Tensor& key, const at::Tensor& value,
                             int64_t topk) {
  check_dim(centroids, 4, "centroids", "(N, H, C, E)");
  check_float(centroids, "centroids");
  check_dim(key, 4, "k", "(N, H, S, E)");
  check_dim(value, 4, "v", "(N, H, S, M)");
  TORCH_CHECK(key.scalar_type() == centroids.scalar_type() && value.scalar_type() == centroids.scalar_type(),
              "centroids, k and v must share one dtype, got ", centroids.scalar_type(), ", ", key.scalar_type(), ", ",
              value.scalar_type());
  check_same_device(centroids, key, "centroids", "k");
  check_same_device(centroids, value, "centroids", "v");
  TORCH_CHECK(topk >= 0, "topk must be >= 0 (0: no top-k set, rest = A V), got ", topk);
  const Shapes sh{centroids.size(0), centroids.size(1), centroids.size(2), centroids.size(3),
                  key.size(2),       value.size(3),     std::min(topk, key.size(2))};
  TORCH_CHECK(key.size(0) == sh.n && key.size(1) == sh.h && key.size(3) == sh.e, "k must have shape (N, H, S, E) = (",
              sh.n, ", ", sh.h, ", S, ", sh.e, "), got ", key.sizes());
  TORCH_CHECK(value.size(0) == sh.n && value.size(1) == sh.h && value.size(2) == sh.s,
              "v must have shape (N, H, S, M) = (", sh.n, ", ", sh.h, ", ", sh.s, ", M), got ", value.sizes());
  TORCH_CHECK(sh.s >= 1, "k needs at least one key, got S = 0");
  return sh;
}

// Centroid rows per block. A block is a whole head up to kBlockBytes: each GEMM call packs all of K
// or V (S rows) again, so small blocks cost more than their better cache locality saves (measured
// on a Zen 3 EPYC at S = 8k, C = 100, H = 4: 128 kB blocks 15.8 + 11.6 ms of GEMM CPU time a call,
// whole heads 6.8 + 5.5). The forward splits heads further when there are fewer of them than
// threads (its blocks are independent tasks); the backward never does (a head's blocks run in order,
// in one task), so its sums do not depend on the thread count.
constexpr int64_t kBlockBytes = 4 << 20;

int64_t block_rows(int64_t heads, int64_t c, int64_t row_bytes, bool split_for_threads) {
  int64_t rows = std::clamp<int64_t>(kBlockBytes / row_bytes, 1, std::max<int64_t>(c, 1));
  const int64_t threads = at::get_num_threads();
  if (split_for_threads && heads * ((c + rows - 1) / rows) < threads) {
    const int64_t per_head = (threads + heads - 1) / heads;
    rows = std::max<int64_t>(1, (c + per_head - 1) / per_head);
  }
  return rows;
}

// The forward of centroid_attention (attn != nullptr: the weights are written there) and of
// centroid_topk (attn == nullptr: they stay in a per-thread block).
template <typename T>
void centroid_forward(const Shapes& sh, const T* cen, const T* key, const T* value, const std::vector<T>& allowed,
                      T scale, T* attn, int64_t* top, T* mass, T* rest) {
  const int64_t s = sh.s, e = sh.e, m = sh.m, c = sh.c, kk = sh.k;
  const int64_t rows = block_rows(sh.n * sh.h, c, s * static_cast<int64_t>(sizeof(T)), true);
  const int64_t blocks = (c + rows - 1) / rows;
  at::parallel_for(0, sh.n * sh.h * blocks, grain_for(rows * s * (e + m)), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(attn == nullptr ? rows * s : 0), scaled(rows * e), maxima(2 * s + kMaxLanes<T>);
    std::vector<Entry<T>> buf(s);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / blocks, r0 = (task % blocks) * rows, nr = std::min(rows, c - r0);
      const int64_t first = head * c + r0;  // the block's first row of (N * H * C)
      const T* al = allowed.empty() ? nullptr : allowed.data() + (head / sh.h) * s;
      const T* kh = key + head * s * e;
      const T* vh = value + head * s * m;
      T* block = attn == nullptr ? scratch.data() : attn + first * s;
      for (int64_t i = 0; i < nr * e; ++i) scaled[i] = cen[first * e + i] * scale;
      gemm_rows<T>(false, true, nr, s, e, T(1), scaled.data(), e, kh, e, T(0), block, s);  // (nr, S) scores
      for (int64_t r = 0; r < nr; ++r) {
        T* w = block + r * s;  // the scores become the weights, in place
        int64_t* tr = top + (first + r) * kk;
        Groups g;
        softmax_row<T>(static_cast<const T*>(w), al, s, kk, w, maxima.data(), &g);
        if (kk > 0)
          select_row<T>(static_cast<const T*>(w), al, s, kk, static_cast<const T*>(maxima.data()),
                        static_cast<const Groups*>(&g), buf.data(), maxima.data() + s, tr);
        T sum = 0;
        for (int64_t i = 0; i < kk; ++i) sum += w[tr[i]];
        mass[first + r] = sum;
      }
      T* rb = rest + first * m;
      gemm_rows<T>(false, false, nr, m, s, T(1), block, s, vh, m, T(0), rb, m);  // (nr, M) = A V
      for (int64_t r = 0; r < nr; ++r) {  // minus the k top terms: the rest
        const T* w = block + r * s;
        const int64_t* tr = top + (first + r) * kk;
        T* o = rb + r * m;
        for (int64_t i = 0; i < kk; ++i) {
          const T wt = w[tr[i]];
          const T* vt = vh + tr[i] * m;
          for (int64_t x = 0; x < m; ++x) o[x] -= wt * vt[x];
        }
      }
    }
  });
}

std::vector<at::Tensor> centroid_impl(const at::Tensor& centroids_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                      const std::optional<at::Tensor>& key_padding_mask, int64_t topk, double scale,
                                      bool keep_attn) {
  const Shapes sh = check_centroid_inputs(centroids_in, k_in, v_in, topk);
  const at::Tensor padded = checked_key_padding(key_padding_mask, centroids_in, sh.n, sh.s);
  const at::Tensor centroids = centroids_in.contiguous(), key = k_in.contiguous(), value = v_in.contiguous();
  at::Tensor attn = at::empty({sh.n, sh.h, sh.c, keep_attn ? sh.s : 0}, centroids.options());
  at::Tensor top = at::empty({sh.n, sh.h, sh.c, sh.k}, centroids.options().dtype(at::kLong));
  at::Tensor mass = at::empty({sh.n, sh.h, sh.c}, centroids.options());
  at::Tensor rest = at::empty({sh.n, sh.h, sh.c, sh.m}, centroids.options());
  AT_DISPATCH_FLOATING_TYPES(centroids.scalar_type(), "centroid_attention", [&] {
    centroid_forward<scalar_t>(sh, centroids.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                               value.const_data_ptr<scalar_t>(), allowed_keys<scalar_t>(padded, sh.n, sh.s),
                               static_cast<scalar_t>(scale), keep_attn ? attn.mutable_data_ptr<scalar_t>() : nullptr,
                               top.mutable_data_ptr<int64_t>(), mass.mutable_data_ptr<scalar_t>(),
                               rest.mutable_data_ptr<scalar_t>());
  });
  return {attn, top, mass, rest};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> centroid_attention_cpu(
    const at::Tensor& centroids, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, int64_t topk, double scale) {
  auto out = centroid_impl(centroids, k, v, key_padding_mask, topk, scale, true);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> centroid_topk_cpu(const at::Tensor& centroids, const at::Tensor& k,
                                                                 const at::Tensor& v,
                                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                                 int64_t topk, double scale) {
  auto out = centroid_impl(centroids, k, v, key_padding_mask, topk, scale, false);
  return {out[1], out[2], out[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> centroid_attention_backward_cpu(
    const at::Tensor& grad_mass_in, const at::Tensor& grad_rest_in, const at::Tensor& attn_in, const at::Tensor& top_in,
    const at::Tensor& centroids_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale_in) {
  const Shapes sh = check_centroid_inputs(centroids_in, k_in, v_in, top_in.dim() == 4 ? top_in.size(3) : 1);
  check_index(top_in, "top");
  TORCH_CHECK(top_in.dim() == 4 && top_in.size(0) == sh.n && top_in.size(1) == sh.h && top_in.size(2) == sh.c &&
                  top_in.size(3) <= sh.s,
              "top must have shape (N, H, C, topk) = (", sh.n, ", ", sh.h, ", ", sh.c, ", topk <= ", sh.s, "), got ",
              top_in.sizes());
  const auto dtype = centroids_in.scalar_type();
  TORCH_CHECK(attn_in.sizes() == at::IntArrayRef({sh.n, sh.h, sh.c, sh.s}) && attn_in.scalar_type() == dtype,
              "attn must have shape (N, H, C, S) = (", sh.n, ", ", sh.h, ", ", sh.c, ", ", sh.s,
              ") and the dtype of centroids, got ", attn_in.sizes(), " ", attn_in.scalar_type());
  TORCH_CHECK(grad_mass_in.sizes() == at::IntArrayRef({sh.n, sh.h, sh.c}) && grad_mass_in.scalar_type() == dtype,
              "grad_mass must have shape (N, H, C) and the dtype of centroids, got ", grad_mass_in.sizes(), " ",
              grad_mass_in.scalar_type());
  TORCH_CHECK(grad_rest_in.sizes() == at::IntArrayRef({sh.n, sh.h, sh.c, sh.m}) && grad_rest_in.scalar_type() == dtype,
              "grad_rest must have shape (N, H, C, M) and the dtype of centroids, got ", grad_rest_in.sizes(), " ",
              grad_rest_in.scalar_type());
  for (const auto* t : {&grad_mass_in, &grad_rest_in, &attn_in, &top_in})
    check_same_device(centroids_in, *t, "centroids", "every other argument");
  const at::Tensor grad_mass = grad_mass_in.contiguous(), grad_rest = grad_rest_in.contiguous();
  const at::Tensor attn = attn_in.contiguous(), top = top_in.contiguous(), centroids = centroids_in.contiguous();
  const at::Tensor key = k_in.contiguous(), value = v_in.contiguous();
  at::Tensor grad_cen = at::empty_like(centroids), grad_k = at::empty_like(key), grad_v = at::empty_like(value);
  if (sh.c == 0) {
    grad_k.zero_();
    grad_v.zero_();
  }
  const int64_t kk = top.size(3);
  AT_DISPATCH_FLOATING_TYPES(dtype, "centroid_attention_backward", [&] {
    using T = scalar_t;
    const int64_t s = sh.s, e = sh.e, m = sh.m, c = sh.c;
    const T scale = static_cast<T>(scale_in);
    const int64_t rows = block_rows(sh.n * sh.h, c, s * static_cast<int64_t>(sizeof(T)), false);
    const T* gm = grad_mass.const_data_ptr<T>();
    const T* gr = grad_rest.const_data_ptr<T>();
    const T* a = attn.const_data_ptr<T>();
    const int64_t* tp = top.const_data_ptr<int64_t>();
    const T* cp = centroids.const_data_ptr<T>();
    const T* kp = key.const_data_ptr<T>();
    const T* vp = value.const_data_ptr<T>();
    T* gc = grad_cen.mutable_data_ptr<T>();
    T* gk = grad_k.mutable_data_ptr<T>();
    T* gv = grad_v.mutable_data_ptr<T>();
    // One (n, h) per task: its blocks add into the head's key and value gradients, in order.
    at::parallel_for(0, sh.n * sh.h, grain_for(c * s * (2 * e + 2 * m)), [&](int64_t begin, int64_t end) {
      std::vector<T> block(rows * s);
      for (int64_t head = begin; head < end; ++head) {
        const T* kh = kp + head * s * e;
        const T* vh = vp + head * s * m;
        T* gkh = gk + head * s * e;
        T* gvh = gv + head * s * m;
        for (int64_t r0 = 0; r0 < c; r0 += rows) {
          const int64_t nr = std::min(rows, c - r0), first = head * c + r0;
          const T* ab = a + first * s;
          const T* grb = gr + first * m;
          const T beta = r0 == 0 ? T(0) : T(1);
          T* g = block.data();
          gemm_rows<T>(false, true, nr, s, m, T(1), grb, m, vh, m, T(0), g, s);  // dA = g_rest V^T
          for (int64_t r = 0; r < nr; ++r) {
            T* gr_row = g + r * s;
            const int64_t* tr = tp + (first + r) * kk;
            for (int64_t i = 0; i < kk; ++i) gr_row[checked_key(tr[i], s)] = gm[first + r];  // top: d m̂
            softmax_backward_row<T>(static_cast<const T*>(gr_row), ab + r * s, s, gr_row);  // dS, in place
          }
          gemm_rows<T>(false, false, nr, e, s, scale, g, s, kh, e, T(0), gc + first * e, e);  // d centroids
          gemm_rows<T>(true, false, s, e, nr, scale, g, s, cp + first * e, e, beta, gkh, e);  // dk += dS^T C
          gemm_rows<T>(true, false, s, m, nr, T(1), ab, s, grb, m, beta, gvh, m);            // dv += A^T g_rest
          for (int64_t r = 0; r < nr; ++r) {  // minus the top terms, which are not in rest
            const int64_t* tr = tp + (first + r) * kk;
            const T* grow = grb + r * m;
            for (int64_t i = 0; i < kk; ++i) {
              const T w = ab[r * s + tr[i]];
              T* gvt = gvh + tr[i] * m;
              for (int64_t x = 0; x < m; ++x) gvt[x] -= w * grow[x];
            }
          }
        }
      }
    });
  });
  return {grad_cen, grad_k, grad_v};
}

TORCH_LIBRARY_IMPL(fairseq_clustered, CPU, m) {
  m.impl("softmax_topk", &softmax_topk_cpu);
  m.impl("centroid_attention", &centroid_attention_cpu);
  m.impl("centroid_attention_backward", &centroid_attention_backward_cpu);
  m.impl("centroid_topk", &centroid_topk_cpu);
}

}  // namespace fca
