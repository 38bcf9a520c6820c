// Lloyd's k-means in Hamming space on packed LSH codes (DESIGN.md §2, step 2).
//
// The random parts (initial centroids, the re-seed candidate of every cluster at every
// iteration) are drawn by the caller from its torch.Generator and passed in as positions, so
// this kernel is deterministic integer code and equals the reference bit for bit: assign =
// argmin popcount(h xor c) with ties to the lowest index; update = per-bit majority (a tie votes
// 0); a cluster left empty takes the code of its re-seed position. Padded queries get -1.
#include "cpu_common.h"

#include <torch/library.h>

#include <vector>

namespace fca {
namespace {

// Nearest centroid of each query in [begin, end) of one (n, h) row: popcount(h xor c) against
// every centroid, strictly smaller wins (so ties keep the lowest cluster index).
template <typename T>
FCA_INLINE void assign_body(const int64_t* codes, const int64_t* centroids, int64_t clusters, const bool* padded,
                            int64_t begin, int64_t end, int64_t* assignment) {
  for (int64_t l = begin; l < end; ++l) {
    const uint64_t h = static_cast<uint64_t>(codes[l]);
    int64_t best = 0, best_dist = 65;
    for (int64_t j = 0; j < clusters; ++j) {
      const int64_t d = __builtin_popcountll(h ^ static_cast<uint64_t>(centroids[j]));
      if (d < best_dist) {
        best_dist = d;
        best = j;
      }
    }
    assignment[l] = (padded != nullptr && padded[l]) ? -1 : best;
  }
}

template <typename T>
void assign_default(const int64_t* codes, const int64_t* centroids, int64_t clusters, const bool* padded,
                    int64_t begin, int64_t end, int64_t* assignment) {
  assign_body<T>(codes, centroids, clusters, padded, begin, end, assignment);
}

#if FCA_HAVE_MULTIVERSION
// AVX-512: 32 queries at a time in four registers, one broadcast centroid per step, vpopcntq,
// and a masked move of the distance and the index where the new distance is strictly smaller.
FCA_TARGET_AVX512 void assign_avx512(const int64_t* codes, const int64_t* centroids, int64_t clusters,
                                     const bool* padded, int64_t begin, int64_t end, int64_t* assignment) {
  constexpr int64_t R = 4, W = 8;
  int64_t l = begin;
  for (; l + R * W <= end; l += R * W) {
    __m512i h[R], dist[R], best[R];
    for (int r = 0; r < R; ++r) {
      h[r] = _mm512_loadu_si512(codes + l + r * W);
      dist[r] = _mm512_set1_epi64(65);
      best[r] = _mm512_setzero_si512();
    }
    for (int64_t j = 0; j < clusters; ++j) {
      const __m512i c = _mm512_set1_epi64(centroids[j]), index = _mm512_set1_epi64(j);
      for (int r = 0; r < R; ++r) {
        const __m512i d = _mm512_popcnt_epi64(_mm512_xor_si512(h[r], c));
        const __mmask8 closer = _mm512_cmplt_epi64_mask(d, dist[r]);
        dist[r] = _mm512_mask_mov_epi64(dist[r], closer, d);
        best[r] = _mm512_mask_mov_epi64(best[r], closer, index);
      }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_si512(assignment + l + r * W, best[r]);
    if (padded != nullptr)
      for (int64_t w = 0; w < R * W; ++w)
        if (padded[l + w]) assignment[l + w] = -1;
  }
  assign_body<int>(codes, centroids, clusters, padded, l, end, assignment);
}
FCA_TARGET_AVX2 void assign_avx2(const int64_t* codes, const int64_t* centroids, int64_t clusters,
                                 const bool* padded, int64_t begin, int64_t end, int64_t* assignment) {
  assign_body<int>(codes, centroids, clusters, padded, begin, end, assignment);
}
#endif

void assign(const int64_t* codes, const int64_t* centroids, int64_t clusters, const bool* padded, int64_t begin,
            int64_t end, int64_t* assignment) {
#if FCA_HAVE_MULTIVERSION
  switch (cpu_isa()) {
    case Isa::kAvx512: return assign_avx512(codes, centroids, clusters, padded, begin, end, assignment);
    case Isa::kAvx2: return assign_avx2(codes, centroids, clusters, padded, begin, end, assignment);
    default: break;
  }
#endif
  assign_default<int>(codes, centroids, clusters, padded, begin, end, assignment);
}

// Add the bits of each member to its cluster's per-bit counters.
template <typename T, int VB>
FCA_INLINE void count_bits_body(const int64_t* codes, const int64_t* assignment, int64_t length, int64_t bits,
                                int32_t* ones, int64_t* sizes) {
  for (int64_t l = 0; l < length; ++l) {
    const int64_t a = assignment[l];
    if (a < 0) continue;
    const uint64_t h = static_cast<uint64_t>(codes[l]);
    int32_t* row = ones + a * 64;
    for (int64_t b = 0; b < 64; ++b) row[b] += static_cast<int32_t>((h >> b) & 1u);
    sizes[a] += 1;
  }
  (void)bits;
}
FCA_MULTIVERSION(count_bits)

}  // namespace

std::tuple<at::Tensor, at::Tensor> hamming_kmeans_cpu(const at::Tensor& codes_in, const at::Tensor& init_in,
                                                      const at::Tensor& reseed_in,
                                                      const std::optional<at::Tensor>& padding_mask,
                                                      int64_t hash_bits) {
  check_dim(codes_in, 3, "codes", "(N, H, L)");
  check_index(codes_in, "codes");
  check_dim(init_in, 3, "init", "(N, H, C)");
  check_index(init_in, "init");
  check_dim(reseed_in, 4, "reseed", "(iterations, N, H, C)");
  check_index(reseed_in, "reseed");
  TORCH_CHECK(hash_bits >= 1 && hash_bits <= 63, "hash_bits must be in 1..63, got ", hash_bits);
  const int64_t n = codes_in.size(0), h = codes_in.size(1), length = codes_in.size(2);
  const int64_t clusters = init_in.size(2), iterations = reseed_in.size(0);
  TORCH_CHECK(init_in.size(0) == n && init_in.size(1) == h, "init must have shape (N, H, C) = (", n, ", ", h,
              ", C), got ", init_in.sizes());
  TORCH_CHECK(clusters >= 1 && clusters <= length, "clusters (init.size(2)) must be in 1..L = 1..", length, ", got ",
              clusters);
  TORCH_CHECK(reseed_in.size(1) == n && reseed_in.size(2) == h && reseed_in.size(3) == clusters,
              "reseed must have shape (iterations, N, H, C) = (I, ", n, ", ", h, ", ", clusters, "), got ",
              reseed_in.sizes());
  at::Tensor padded;
  if (padding_mask.has_value()) {
    padded = padding_mask->contiguous();
    TORCH_CHECK(padded.scalar_type() == at::kBool, "padding_mask must be bool, got ", padded.scalar_type());
    TORCH_CHECK(padded.dim() == 2 && padded.size(0) == n && padded.size(1) == length,
                "padding_mask must have shape (N, L) = (", n, ", ", length, "), got ", padded.sizes());
  }
  const at::Tensor codes = codes_in.contiguous(), init = init_in.contiguous(), reseed = reseed_in.contiguous();
  TORCH_CHECK(init.numel() == 0 || (init.min().item<int64_t>() >= 0 && init.max().item<int64_t>() < length),
              "init holds positions outside 0..L-1");
  TORCH_CHECK(reseed.numel() == 0 || (reseed.min().item<int64_t>() >= 0 && reseed.max().item<int64_t>() < length),
              "reseed holds positions outside 0..L-1");

  at::Tensor assignment = at::empty({n, h, length}, codes.options());
  at::Tensor counts = at::zeros({n, h, clusters}, codes.options());
  std::vector<int64_t> centroids(n * h * clusters);
  const int64_t* code = codes.const_data_ptr<int64_t>();
  int64_t* assign_out = assignment.mutable_data_ptr<int64_t>();
  const bool* pad = padding_mask.has_value() ? padded.const_data_ptr<bool>() : nullptr;
  const int64_t rows = n * h;
  const uint64_t keep = (uint64_t{1} << hash_bits) - 1;

  const int64_t* init_pos = init.const_data_ptr<int64_t>();
  const int64_t* reseed_pos = reseed.const_data_ptr<int64_t>();
  int64_t* count_out = counts.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < clusters; ++j) centroids[r * clusters + j] = code[r * length + init_pos[r * clusters + j]];

  // Assignment of queries [l0, l1) of row r.
  auto assign_range = [&](int64_t r, int64_t l0, int64_t l1) {
    assign(code + r * length, centroids.data() + r * clusters, clusters,
           pad == nullptr ? nullptr : pad + (r / h) * length, l0, l1, assign_out + r * length);
  };
  // Majority vote (or re-seed) of every centroid of row r after iteration it.
  auto update_row = [&](int64_t r, int64_t it, int32_t* ones, int64_t* sizes) {
    std::fill(ones, ones + clusters * 64, 0);
    std::fill(sizes, sizes + clusters, 0);
    count_bits<int>(code + r * length, assign_out + r * length, length, hash_bits, ones, sizes);
    const int64_t* pos = reseed_pos + (it * rows + r) * clusters;
    for (int64_t j = 0; j < clusters; ++j) {
      if (sizes[j] == 0) {
        centroids[r * clusters + j] = code[r * length + pos[j]];
        continue;
      }
      uint64_t c = 0;
      for (int64_t b = 0; b < 64; ++b)
        c |= static_cast<uint64_t>(2 * static_cast<int64_t>(ones[j * 64 + b]) > sizes[j]) << b;
      centroids[r * clusters + j] = static_cast<int64_t>(c & keep);
    }
  };
  auto count_row = [&](int64_t r) {
    for (int64_t l = 0; l < length; ++l) {
      const int64_t a = assign_out[r * length + l];
      if (a >= 0) count_out[r * clusters + a] += 1;
    }
  };

  if (rows >= at::get_num_threads()) {
    // Enough (n, h) rows to keep every thread busy: each task runs whole rows through every
    // iteration, so the threads meet once, not twice per iteration (on a busy node every
    // meeting can cost a scheduler slice).
    at::parallel_for(0, rows, grain_for(length * clusters * (iterations + 1)), [&](int64_t begin, int64_t end) {
      std::vector<int32_t> ones(clusters * 64);
      std::vector<int64_t> sizes(clusters);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t it = 0; it < iterations; ++it) {
          assign_range(r, 0, length);
          update_row(r, it, ones.data(), sizes.data());
        }
        assign_range(r, 0, length);
        count_row(r);
      }
    });
    return {assignment, counts};
  }
  // Few rows (e.g. one sequence, one head): split each assignment over the queries.
  auto assign_all = [&] {
    at::parallel_for(0, rows * length, grain_for(clusters), [&](int64_t begin, int64_t end) {
      while (begin < end) {
        const int64_t r = begin / length, l0 = begin % length;
        const int64_t l1 = std::min(length, l0 + (end - begin));
        assign_range(r, l0, l1);
        begin += l1 - l0;
      }
    });
  };
  std::vector<int32_t> ones(clusters * 64);
  std::vector<int64_t> sizes(clusters);
  for (int64_t it = 0; it < iterations; ++it) {
    assign_all();
    for (int64_t r = 0; r < rows; ++r) update_row(r, it, ones.data(), sizes.data());
  }
  assign_all();
  for (int64_t r = 0; r < rows; ++r) count_row(r);
  return {assignment, counts};
}

TORCH_LIBRARY_IMPL(fairseq_clustered, CPU, m) { m.impl("hamming_kmeans", &hamming_kmeans_cpu); }

}  // namespace fca
