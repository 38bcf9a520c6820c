// Lloyd's k-means in Hamming space on packed LSH codes (DESIGN.md §2, step 2).
//
// The random parts (initial centroids, the re-seed candidate of every cluster at every
// iteration) are drawn by the caller from its torch.Generator and passed in as positions, so
// this kernel is deterministic integer code and equals the reference bit for bit: assign =
// argmin popcount(h xor c) with ties to the lowest index; update = per-bit majority (a tie votes
// 0); a cluster left empty takes the code of its re-seed position. Padded queries get -1.
//
// The work is kept incremental, with the same result as recomputing everything:
// - A query's nearest centroid is the minimum of its key (distance << 32 | cluster), so ties go
//   to the lowest index. After an update, a query whose own centroid did not change only needs
//   its key compared with the centroids that did change: every unchanged centroid keeps its old
//   distance, and its old key was not smaller. Only queries whose centroid changed are compared
//   with every centroid. Late iterations change few centroids (about 2-10 % at 8k queries).
// - The per-bit member counts are kept up to date by the queries that moved, and the centroid of
//   a cluster is recomputed only when its members changed (or it is empty and re-seeded).
// The comparisons: on AVX2, of 10 centroids or more with 96 queries or more, blocks of 32
// queries transposed into nibbles against per-centroid lookup tables (scan_avx2_nibbles, about
// one vector operation a distance); else 16 queries at a time against one broadcast centroid
// (AVX2: a nibble-table popcount, vpshufb + vpsadbw, about three a distance), 32 on AVX-512
// (vpopcntq).
#include "cpu_common.h"

#include <torch/library.h>

#include <vector>

namespace fca {
namespace {

constexpr int64_t kNoKey = std::numeric_limits<int64_t>::max();
constexpr int64_t kClusterMask = 0xffffffff;

// keys[i] = min(keys[i], min over j of popcount(q[i] ^ codes[j]) << 32 | index[j]), i < count.
FCA_INLINE void scan_scalar(const int64_t* q, int64_t count, const int64_t* codes, const int64_t* index, int64_t m,
                            int64_t* keys) {
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t h = static_cast<uint64_t>(q[i]);
    int64_t best = keys[i];
    for (int64_t j = 0; j < m; ++j) {
      const int64_t key = int64_t{__builtin_popcountll(h ^ static_cast<uint64_t>(codes[j]))} << 32 | index[j];
      best = key < best ? key : best;
    }
    keys[i] = best;
  }
}

#if FCA_HAVE_MULTIVERSION
FCA_TARGET_AVX2 void scan_avx2_scalar(const int64_t* q, int64_t count, const int64_t* codes, const int64_t* index,
                                      int64_t m, int64_t* keys) {
  scan_scalar(q, count, codes, index, m, keys);  // compiled with popcnt here
}

// popcount of each 64-bit lane: per-nibble table lookups (vpshufb), byte sums per lane (vpsadbw).
FCA_TARGET_AVX2 FCA_INLINE __m256i popcount_epi64_avx2(__m256i x) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(x, nibble);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble);
  const __m256i bytes = _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
  return _mm256_sad_epu8(bytes, _mm256_setzero_si256());
}

FCA_TARGET_AVX2 void scan_avx2(const int64_t* q, int64_t count, const int64_t* codes, const int64_t* index,
                               int64_t m, int64_t* keys) {
  constexpr int64_t R = 4, W = 4;
  int64_t i = 0;
  for (; i + R * W <= count; i += R * W) {
    __m256i h[R], best[R];
    for (int r = 0; r < R; ++r) {
      h[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i + r * W));
      best[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i + r * W));
    }
    for (int64_t j = 0; j < m; ++j) {
      const __m256i c = _mm256_set1_epi64x(codes[j]), idx = _mm256_set1_epi64x(index[j]);
      for (int r = 0; r < R; ++r) {
        const __m256i d = popcount_epi64_avx2(_mm256_xor_si256(h[r], c));
        const __m256i key = _mm256_or_si256(_mm256_slli_epi64(d, 32), idx);
        best[r] = _mm256_blendv_epi8(best[r], key, _mm256_cmpgt_epi64(best[r], key));
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + i + r * W), best[r]);
  }
  scan_avx2_scalar(q + i, count - i, codes, index, m, keys + i);
}

// The AVX2 scan of many queries against many centroids, about 1 vector operation a distance
// instead of 3: blocks of 32 queries are transposed into 16 vectors, vector n holding nibble n of
// each query (one byte a query), and each centroid into 16 lookup tables, table n giving
// popcount(x ^ nibble n of the centroid) for x = 0..15. A distance is then 16 table lookups
// (vpshufb) summed by byte adds, for 32 queries at once, and a block's nearest centroid is
// tracked in bytes (distance, ordinal in a chunk of at most 128 centroids), merged into the keys
// once a chunk. `index` must be increasing (the callers' all_index and changed_index are): among
// equal distances, the first centroid of a chunk (strict compare) is the lowest index, as in the
// keys. The lanes of a transposed block hold the queries in the order nibble_lanes_avx2 finds.
constexpr int64_t kNibbleChunk = 128;     // centroids a chunk: their tables are 32 kB
// Below these the transposition and merge (about 1.5 ns a query) or the tables cost more than they save.
constexpr int64_t kNibbleMinCentroids = 10, kNibbleMinQueries = 96;

FCA_TARGET_AVX2 FCA_INLINE void nibble_transpose_avx2(const int64_t* q, __m256i* nib) {
  // within a 128-bit lane (two codes): byte b of both as word b
  const __m256i pair = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,  //
                                        0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256i w[8], v[2][4];
  for (int k = 0; k < 8; ++k)
    w[k] = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 4 * k)), pair);
  for (int g = 0; g < 2; ++g) {  // codes 16g..16g+15: bytes (2t, 2t+1) of 8 codes a lane in v[g][t]
    const __m256i ab_lo = _mm256_unpacklo_epi16(w[4 * g], w[4 * g + 1]);
    const __m256i ab_hi = _mm256_unpackhi_epi16(w[4 * g], w[4 * g + 1]);
    const __m256i cd_lo = _mm256_unpacklo_epi16(w[4 * g + 2], w[4 * g + 3]);
    const __m256i cd_hi = _mm256_unpackhi_epi16(w[4 * g + 2], w[4 * g + 3]);
    v[g][0] = _mm256_unpacklo_epi32(ab_lo, cd_lo);
    v[g][1] = _mm256_unpackhi_epi32(ab_lo, cd_lo);
    v[g][2] = _mm256_unpacklo_epi32(ab_hi, cd_hi);
    v[g][3] = _mm256_unpackhi_epi32(ab_hi, cd_hi);
  }
  for (int t = 0; t < 4; ++t) {  // byte 2t and 2t + 1 of the 32 codes, then their nibbles
    const __m256i b0 = _mm256_unpacklo_epi64(v[0][t], v[1][t]), b1 = _mm256_unpackhi_epi64(v[0][t], v[1][t]);
    nib[4 * t] = _mm256_and_si256(b0, low);
    nib[4 * t + 1] = _mm256_and_si256(_mm256_srli_epi16(b0, 4), low);
    nib[4 * t + 2] = _mm256_and_si256(b1, low);
    nib[4 * t + 3] = _mm256_and_si256(_mm256_srli_epi16(b1, 4), low);
  }
}

// lane[l]: the query (of 32) that byte lane l of a transposed block holds, found by
// transposing the codes 0..31 once.
struct NibbleLanes {
  uint8_t lane[32];
};
FCA_TARGET_AVX2 NibbleLanes nibble_lanes_avx2() {
  int64_t ids[32];
  for (int64_t i = 0; i < 32; ++i) ids[i] = i;  // byte 0 = i: nibble 0 = i & 15, nibble 1 = i >> 4
  alignas(32) __m256i nib[16];
  nibble_transpose_avx2(ids, nib);
  alignas(32) uint8_t lo[32], hi[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lo), nib[0]);
  _mm256_store_si256(reinterpret_cast<__m256i*>(hi), nib[1]);
  NibbleLanes lanes;
  for (int l = 0; l < 32; ++l) lanes.lane[l] = static_cast<uint8_t>(lo[l] | hi[l] << 4);
  return lanes;
}

// R transposed blocks (block r: nib[16 r .. 16 r + 15]) against the chunk's mc tables: best distance and
// ordinal per lane, block r's in best_out / ord_out[32 r .. 32 r + 31].
template <int R>
FCA_TARGET_AVX2 __attribute__((noinline)) void nibble_blocks_avx2(const __m256i* nib, const __m128i* tables, int64_t mc,
                                                                  uint8_t* best_out, uint8_t* ord_out) {
  __m256i best[R], ord[R];
  for (int r = 0; r < R; ++r) {
    best[r] = _mm256_set1_epi8(0x7f);  // above any distance (<= 64): the first centroid always wins
    ord[r] = _mm256_setzero_si256();
  }
  for (int64_t j = 0; j < mc; ++j) {
    const __m128i* t = tables + j * 16;
    __m256i acc[R];
    const __m256i t0 = _mm256_broadcastsi128_si256(_mm_load_si128(t));
    for (int r = 0; r < R; ++r) acc[r] = _mm256_shuffle_epi8(t0, nib[r * 16]);
#pragma GCC unroll 3  // unrolled in full, GCC hoists the 16 tables and spills them (1.7x slower)
    for (int n = 1; n < 16; ++n) {
      const __m256i tn = _mm256_broadcastsi128_si256(_mm_load_si128(t + n));
      for (int r = 0; r < R; ++r) acc[r] = _mm256_add_epi8(acc[r], _mm256_shuffle_epi8(tn, nib[r * 16 + n]));
    }
    const __m256i o = _mm256_set1_epi8(static_cast<char>(j));
    for (int r = 0; r < R; ++r) {
      const __m256i closer = _mm256_cmpgt_epi8(best[r], acc[r]);  // strict: the earlier centroid keeps a tie
      best[r] = _mm256_min_epu8(best[r], acc[r]);
      ord[r] = _mm256_blendv_epi8(ord[r], o, closer);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(best_out + 32 * r), best[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ord_out + 32 * r), ord[r]);
  }
}

FCA_TARGET_AVX2 void scan_avx2_nibbles(const int64_t* q, int64_t count, const int64_t* codes, const int64_t* index,
                                       int64_t m, int64_t* keys) {
  static const NibbleLanes lanes = nibble_lanes_avx2();
  constexpr int R = 4;
  const __m128i pop = _mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m128i iota = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(32) __m128i tables[kNibbleChunk * 16];
  alignas(32) __m256i nib[R * 16];
  alignas(32) uint8_t best[R * 32], ord[R * 32];
  int64_t tail[32];
  const int64_t blocks = (count + 31) / 32;
  for (int64_t c0 = 0; c0 < m; c0 += kNibbleChunk) {
    const int64_t mc = std::min(kNibbleChunk, m - c0);
    for (int64_t j = 0; j < mc; ++j) {
      const uint64_t c = static_cast<uint64_t>(codes[c0 + j]);
      for (int n = 0; n < 16; ++n)
        tables[j * 16 + n] = _mm_shuffle_epi8(pop, _mm_xor_si128(iota, _mm_set1_epi8(static_cast<char>(c >> 4 * n & 15))));
    }
    for (int64_t b0 = 0; b0 < blocks; b0 += R) {
      const int rb = static_cast<int>(std::min<int64_t>(R, blocks - b0));
      for (int r = 0; r < rb; ++r) {
        const int64_t i0 = (b0 + r) * 32;
        const int64_t* src = q + i0;
        if (count - i0 < 32) {  // the last block: zero codes in the missing lanes, never merged
          std::fill(tail, tail + 32, 0);
          std::copy(q + i0, q + count, tail);
          src = tail;
        }
        nibble_transpose_avx2(src, nib + 16 * r);
      }
      switch (rb) {
        case 4: nibble_blocks_avx2<4>(nib, tables, mc, best, ord); break;
        case 3: nibble_blocks_avx2<3>(nib, tables, mc, best, ord); break;
        case 2: nibble_blocks_avx2<2>(nib, tables, mc, best, ord); break;
        default: nibble_blocks_avx2<1>(nib, tables, mc, best, ord); break;
      }
      for (int r = 0; r < rb; ++r) {
        const int64_t i0 = (b0 + r) * 32;
        for (int l = 0; l < 32; ++l) {
          const int64_t i = i0 + lanes.lane[l];
          if (i >= count) continue;
          const int64_t key = int64_t{best[32 * r + l]} << 32 | index[c0 + ord[32 * r + l]];
          keys[i] = key < keys[i] ? key : keys[i];
        }
      }
    }
  }
}

FCA_TARGET_AVX512 void scan_avx512(const int64_t* q, int64_t count, const int64_t* codes, const int64_t* index,
                                   int64_t m, int64_t* keys) {
  constexpr int64_t R = 4, W = 8;
  int64_t i = 0;
  for (; i + R * W <= count; i += R * W) {
    __m512i h[R], best[R];
    for (int r = 0; r < R; ++r) {
      h[r] = _mm512_loadu_si512(q + i + r * W);
      best[r] = _mm512_loadu_si512(keys + i + r * W);
    }
    for (int64_t j = 0; j < m; ++j) {
      const __m512i c = _mm512_set1_epi64(codes[j]), idx = _mm512_set1_epi64(index[j]);
      for (int r = 0; r < R; ++r) {
        const __m512i d = _mm512_popcnt_epi64(_mm512_xor_si512(h[r], c));
        best[r] = _mm512_min_epi64(best[r], _mm512_or_si512(_mm512_slli_epi64(d, 32), idx));
      }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_si512(keys + i + r * W, best[r]);
  }
  scan_avx2_scalar(q + i, count - i, codes, index, m, keys + i);
}
#endif

void scan(const int64_t* q, int64_t count, const int64_t* codes, const int64_t* index, int64_t m, int64_t* keys) {
#if FCA_HAVE_MULTIVERSION
  switch (cpu_isa()) {
    case Isa::kAvx512: return scan_avx512(q, count, codes, index, m, keys);
    case Isa::kAvx2:
      if (count >= kNibbleMinQueries && m >= kNibbleMinCentroids) return scan_avx2_nibbles(q, count, codes, index, m, keys);
      return scan_avx2(q, count, codes, index, m, keys);
    default: break;
  }
#endif
  scan_scalar(q, count, codes, index, m, keys);
}

// Add (sign +1) or remove (-1) a code's bits to / from a cluster's 64 per-bit counters.
void add_bits_scalar(uint64_t h, int32_t sign, int32_t* row) {
  for (int64_t b = 0; b < 64; ++b) row[b] += sign * static_cast<int32_t>((h >> b) & 1u);
}

#if FCA_HAVE_MULTIVERSION
// 8 counters a vector: a byte of h broadcast, its bits as all-ones lanes, masked sign added.
FCA_TARGET_AVX2 void add_bits_avx2(uint64_t h, int32_t sign, int32_t* row) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128), s = _mm256_set1_epi32(sign);
  for (int k = 0; k < 8; ++k) {
    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(h >> 8 * k & 0xff)), bit), bit);
    __m256i* p = reinterpret_cast<__m256i*>(row + 8 * k);
    _mm256_storeu_si256(p, _mm256_add_epi32(_mm256_loadu_si256(p), _mm256_and_si256(set, s)));
  }
}
#endif

void add_bits(uint64_t h, int32_t sign, int32_t* row) {
#if FCA_HAVE_MULTIVERSION
  switch (cpu_isa()) {
    case Isa::kAvx512:  // (a masked AVX-512 add would do 16 a vector; this CPU cannot run it to test it)
    case Isa::kAvx2: return add_bits_avx2(h, sign, row);
    default: break;
  }
#endif
  add_bits_scalar(h, sign, row);
}

// The k-means state of one (n, h) row.
struct Row {
  const int64_t* code;  // (L) the queries' codes
  const bool* pad;      // (L) or nullptr
  int64_t* assignment;  // (L) the committed assignment (-1: none yet / padded)
  int64_t* keys;        // (L) the latest assignment pass: distance << 32 | cluster
  int64_t* centroids;   // (C)
  uint8_t* changed;     // (C) centroid changed by the last update (all 1 before the first pass)
  const int64_t* all_index;  // (C) 0..C-1
  std::vector<int64_t> changed_codes, changed_index;  // the centroids a partial pass scans
  bool first = true;
};

// Assignment pass over queries [l0, l1) of a row (reads the row's centroids, writes its keys).
// The queries whose centroid changed are compared with every centroid, the others with the
// changed ones only; each group is gathered into `scratch` (6 (l1 - l0) values) for the scan.
void assign_range(const Row& row, int64_t clusters, int64_t l0, int64_t l1, int64_t* scratch) {
  const bool* pad = row.pad;
  if (row.first && pad == nullptr) {  // the first pass: every query, every centroid, in place
    std::fill(row.keys + l0, row.keys + l1, kNoKey);
    scan(row.code + l0, l1 - l0, row.centroids, row.all_index, clusters, row.keys + l0);
    return;
  }
  const int64_t span = l1 - l0;
  int64_t *q_full = scratch, *k_full = scratch + span, *at_full = scratch + 2 * span;
  int64_t *q_part = scratch + 3 * span, *k_part = scratch + 4 * span, *at_part = scratch + 5 * span;
  int64_t full = 0, part = 0;
  // Both groups written every query, one of them kept: no branch on which (it is taken at random).
  for (int64_t l = l0; l < l1; ++l) {
    if (pad != nullptr && pad[l]) continue;
    const int64_t key = row.keys[l], code = row.code[l];
    const bool scan_all = row.first || row.changed[key & kClusterMask];
    q_full[full] = code;
    at_full[full] = l;
    full += scan_all;
    q_part[part] = code;
    k_part[part] = key;
    at_part[part] = l;
    part += !scan_all;
  }
  std::fill(k_full, k_full + full, kNoKey);
  if (full > 0) scan(q_full, full, row.centroids, row.all_index, clusters, k_full);
  if (part > 0 && !row.changed_codes.empty())
    scan(q_part, part, row.changed_codes.data(), row.changed_index.data(),
         static_cast<int64_t>(row.changed_codes.size()), k_part);
  for (int64_t i = 0; i < full; ++i) row.keys[at_full[i]] = k_full[i];
  for (int64_t i = 0; i < part; ++i) row.keys[at_part[i]] = k_part[i];
}

// Commit the latest pass: move the queries that changed cluster in the counts; with `reseed`
// (this iteration's re-seed positions), recompute the centroids whose members changed and
// every empty one, and record which centroids changed.
void commit_row(Row& row, int64_t length, int64_t clusters, uint64_t keep, int32_t* ones, int64_t* sizes,
                uint8_t* touched, const int64_t* reseed) {
  std::fill(touched, touched + clusters, 0);
  for (int64_t l = 0; l < length; ++l) {
    if (row.pad != nullptr && row.pad[l]) continue;
    const int64_t now = row.keys[l] & kClusterMask, before = row.assignment[l];
    if (now == before) continue;
    const uint64_t h = static_cast<uint64_t>(row.code[l]);
    if (before >= 0) {
      add_bits(h, -1, ones + before * 64);
      sizes[before] -= 1;
      touched[before] = 1;
    }
    add_bits(h, 1, ones + now * 64);
    sizes[now] += 1;
    touched[now] = 1;
    row.assignment[l] = now;
  }
  row.first = false;
  if (reseed == nullptr) return;
  row.changed_codes.clear();
  row.changed_index.clear();
  for (int64_t j = 0; j < clusters; ++j) {
    int64_t c = row.centroids[j];
    if (sizes[j] == 0) {
      c = row.code[reseed[j]];
    } else if (touched[j]) {
      uint64_t bits = 0;
      for (int64_t b = 0; b < 64; ++b) bits |= static_cast<uint64_t>(2 * int64_t{ones[j * 64 + b]} > sizes[j]) << b;
      c = static_cast<int64_t>(bits & keep);
    }
    row.changed[j] = c != row.centroids[j];
    if (row.changed[j]) {
      row.centroids[j] = c;
      row.changed_codes.push_back(c);
      row.changed_index.push_back(j);
    }
  }
}

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
  const at::Tensor init = init_in.contiguous(), reseed = reseed_in.contiguous();
  const uint64_t keep = (uint64_t{1} << hash_bits) - 1;
  // The reference reads the low hash_bits bits of a code only. Codes from lsh_hash have no others;
  // any others are masked off here, once.
  at::Tensor codes = codes_in.contiguous();
  const int64_t* raw = codes.const_data_ptr<int64_t>();
  uint64_t stray = 0;  // a plain loop (vectorised), not three ATen calls and their allocations
  for (int64_t i = 0; i < codes.numel(); ++i) stray |= static_cast<uint64_t>(raw[i]) & ~keep;
  if (stray != 0) codes = at::bitwise_and(codes, static_cast<int64_t>(keep));
  TORCH_CHECK(init.numel() == 0 || (init.min().item<int64_t>() >= 0 && init.max().item<int64_t>() < length),
              "init holds positions outside 0..L-1");
  TORCH_CHECK(reseed.numel() == 0 || (reseed.min().item<int64_t>() >= 0 && reseed.max().item<int64_t>() < length),
              "reseed holds positions outside 0..L-1");

  at::Tensor assignment = at::full({n, h, length}, -1, codes.options());
  at::Tensor counts = at::empty({n, h, clusters}, codes.options());
  const int64_t rows = n * h;
  const int64_t* code = codes.const_data_ptr<int64_t>();
  const bool* pad = padding_mask.has_value() ? padded.const_data_ptr<bool>() : nullptr;
  const int64_t* init_pos = init.const_data_ptr<int64_t>();
  const int64_t* reseed_pos = reseed.const_data_ptr<int64_t>();
  int64_t* assign_out = assignment.mutable_data_ptr<int64_t>();
  int64_t* count_out = counts.mutable_data_ptr<int64_t>();

  std::vector<int64_t> keys(rows * length, kNoKey), centroids(rows * clusters), all_index(clusters);
  std::vector<uint8_t> changed(rows * clusters, 1);
  for (int64_t j = 0; j < clusters; ++j) all_index[j] = j;
  std::vector<Row> state(rows);
  for (int64_t r = 0; r < rows; ++r) {
    Row& row = state[r];
    row.code = code + r * length;
    row.pad = pad == nullptr ? nullptr : pad + (r / h) * length;
    row.assignment = assign_out + r * length;
    row.keys = keys.data() + r * length;
    row.centroids = centroids.data() + r * clusters;
    row.changed = changed.data() + r * clusters;
    row.all_index = all_index.data();
    for (int64_t j = 0; j < clusters; ++j) row.centroids[j] = row.code[init_pos[r * clusters + j]];
  }
  // Every iteration of a row: assign, then commit (with the iteration's re-seeds); a last
  // assignment, committed without an update, gives the result and the counts.
  auto finish_row = [&](int64_t r, const int64_t* sizes) {
    std::copy(sizes, sizes + clusters, count_out + r * clusters);
  };

  if (rows >= at::get_num_threads()) {
    // Enough (n, h) rows to keep every thread busy: each task runs whole rows through every
    // iteration, so the threads meet once, not twice per iteration (on a busy node every
    // meeting can cost a scheduler slice).
    at::parallel_for(0, rows, grain_for(length * clusters * (iterations + 1)), [&](int64_t begin, int64_t end) {
      std::vector<int32_t> ones(clusters * 64);
      std::vector<int64_t> sizes(clusters);
      std::vector<uint8_t> touched(clusters);
      std::vector<int64_t> scratch(6 * length);
      for (int64_t r = begin; r < end; ++r) {
        std::fill(ones.begin(), ones.end(), 0);
        std::fill(sizes.begin(), sizes.end(), 0);
        for (int64_t it = 0; it <= iterations; ++it) {
          assign_range(state[r], clusters, 0, length, scratch.data());
          const int64_t* pos = it < iterations ? reseed_pos + (it * rows + r) * clusters : nullptr;
          commit_row(state[r], length, clusters, keep, ones.data(), sizes.data(), touched.data(), pos);
        }
        finish_row(r, sizes.data());
      }
    });
    return {assignment, counts};
  }
  // Few rows (e.g. one sequence, one head): split each assignment pass over the queries.
  std::vector<int32_t> ones(rows * clusters * 64, 0);
  std::vector<int64_t> sizes(rows * clusters, 0);
  std::vector<uint8_t> touched(clusters);
  for (int64_t it = 0; it <= iterations; ++it) {
    at::parallel_for(0, rows * length, grain_for(clusters), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> scratch(6 * std::min(length, end - begin));
      while (begin < end) {
        const int64_t r = begin / length, l0 = begin % length;
        const int64_t l1 = std::min(length, l0 + (end - begin));
        assign_range(state[r], clusters, l0, l1, scratch.data());
        begin += l1 - l0;
      }
    });
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t* pos = it < iterations ? reseed_pos + (it * rows + r) * clusters : nullptr;
      commit_row(state[r], length, clusters, keep, ones.data() + r * clusters * 64, sizes.data() + r * clusters,
                 touched.data(), pos);
    }
  }
  for (int64_t r = 0; r < rows; ++r) finish_row(r, sizes.data() + r * clusters);
  return {assignment, counts};
}

TORCH_LIBRARY_IMPL(fairseq_clustered, CPU, m) { m.impl("hamming_kmeans", &hamming_kmeans_cpu); }

}  // namespace fca
