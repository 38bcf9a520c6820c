// LSH hashing into packed int64 codes (DESIGN.md §2, step 1).
//
// The projections are one GEMM (at::matmul, exactly the reference's call, so codes are
// bit-identical to it) against the planes padded with zero rows to a multiple of 16 (a
// full-width GEMM kernel: 2.3 instead of 3.4 ms at 8k x 4 heads on AVX2); the kernel fuses the
// threshold against the plane offsets with the packing, instead of materialising a bool
// (..., B) tensor and an int64 multiply-sum. `stride` is the padded row length of proj.
#include "cpu_common.h"

#include <torch/library.h>

namespace fca {
namespace {

template <typename T, int VB>
FCA_INLINE void pack_range_body(const T* proj, const T* offsets, int64_t begin, int64_t end, int64_t bits,
                                int64_t stride, int64_t* codes) {
  for (int64_t r = begin; r < end; ++r) {
    const T* p = proj + r * stride;
    uint64_t code = 0;
    for (int64_t b = 0; b < bits; ++b) code |= static_cast<uint64_t>(p[b] > offsets[b]) << b;
    codes[r] = static_cast<int64_t>(code);
  }
}
FCA_MULTIVERSION(pack_range)

#if FCA_HAVE_MULTIVERSION
// float: 8 (AVX2) or 16 (AVX-512) thresholds per compare, their bits taken at once by movemask /
// the compare mask. _CMP_GT_OQ is false for NaN, as `>` is: the same bits as the loop above.
FCA_TARGET_AVX2 void pack_range_avx2_float(const float* proj, const float* offsets, int64_t begin, int64_t end,
                                           int64_t bits, int64_t stride, int64_t* codes) {
  const int64_t full = bits / 8 * 8;
  for (int64_t r = begin; r < end; ++r) {
    const float* p = proj + r * stride;
    uint64_t code = 0;
    int64_t b = 0;
    for (; b < full; b += 8) {
      const __m256 gt = _mm256_cmp_ps(_mm256_loadu_ps(p + b), _mm256_loadu_ps(offsets + b), _CMP_GT_OQ);
      code |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_ps(gt))) << b;
    }
    for (; b < bits; ++b) code |= static_cast<uint64_t>(p[b] > offsets[b]) << b;
    codes[r] = static_cast<int64_t>(code);
  }
}

FCA_TARGET_AVX512 void pack_range_avx512_float(const float* proj, const float* offsets, int64_t begin, int64_t end,
                                               int64_t bits, int64_t stride, int64_t* codes) {
  for (int64_t r = begin; r < end; ++r) {
    const float* p = proj + r * stride;
    uint64_t code = 0;
    for (int64_t b = 0; b < bits; b += 16) {
      const __mmask16 live = bits - b >= 16 ? __mmask16(0xffff) : __mmask16((1u << (bits - b)) - 1);
      const __mmask16 gt = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, p + b),
                                                   _mm512_maskz_loadu_ps(live, offsets + b), _CMP_GT_OQ);
      code |= static_cast<uint64_t>(gt) << b;
    }
    codes[r] = static_cast<int64_t>(code);
  }
}
#endif

template <typename T>
void pack_rows(const T* proj, const T* offsets, int64_t rows, int64_t bits, int64_t stride, int64_t* codes) {
  at::parallel_for(0, rows, grain_for(bits), [&](int64_t begin, int64_t end) {
#if FCA_HAVE_MULTIVERSION
    if constexpr (std::is_same_v<T, float>) {
      switch (cpu_isa()) {
        case Isa::kAvx512: return pack_range_avx512_float(proj, offsets, begin, end, bits, stride, codes);
        case Isa::kAvx2: return pack_range_avx2_float(proj, offsets, begin, end, bits, stride, codes);
        default: break;
      }
    }
#endif
    pack_range<T>(proj, offsets, begin, end, bits, stride, codes);
  });
}

}  // namespace

at::Tensor lsh_hash_cpu(const at::Tensor& x, const at::Tensor& planes) {
  TORCH_CHECK(x.dim() >= 1, "x must have a feature dimension, got a scalar");
  check_dim(planes, 2, "planes", "(hash_bits, E + 1)");
  const int64_t dim = x.size(-1), bits = planes.size(0);
  TORCH_CHECK(planes.size(1) == dim + 1, "planes must have shape (hash_bits, E + 1) = (", bits, ", ", dim + 1,
              ") for x with E = ", dim, ", got ", planes.sizes());
  TORCH_CHECK(bits >= 1 && bits <= 63, "hash_bits (planes.size(0)) must be in 1..63, got ", bits);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ", x.scalar_type());
  check_same_device(x, planes, "x", "planes");
  const auto compute = at::promote_types(x.scalar_type(), at::kFloat);
  // The reference (fairseq_plugin/ops/hashing.py, hash_bits_of): weights = the planes' first E
  // columns padded with zero rows to a multiple of 16; proj = x.to(compute) @ weights.T, ...
  // bit = proj[..., :B] > planes[:, E].
  constexpr int64_t kPlaneRows = 16;
  at::Tensor weights = at::zeros({(bits + kPlaneRows - 1) / kPlaneRows * kPlaneRows, dim}, x.options().dtype(compute));
  weights.narrow(0, 0, bits).copy_(planes.narrow(1, 0, dim));
  // ... in chunks of kHashRows rows of x (the reference's hash_bits_of makes the same calls), so
  // each chunk's projections are packed while they are still in cache.
  constexpr int64_t kHashRows = 2048;
  const at::Tensor rows_of_x = x.to(compute).reshape({-1, dim});
  const int64_t stride = weights.size(0);
  at::Tensor offsets = planes.select(1, dim).to(compute).contiguous();
  auto sizes = x.sizes().vec();
  sizes.pop_back();
  at::Tensor codes = at::empty(sizes, x.options().dtype(at::kLong));
  const int64_t rows = codes.numel();
  AT_DISPATCH_FLOATING_TYPES(compute, "lsh_hash", [&] {
    for (int64_t r0 = 0; r0 < rows; r0 += kHashRows) {
      const int64_t count = std::min(kHashRows, rows - r0);
      const at::Tensor proj = at::mm(rows_of_x.narrow(0, r0, count), weights.t()).contiguous();
      pack_rows<scalar_t>(proj.const_data_ptr<scalar_t>(), offsets.const_data_ptr<scalar_t>(), count, bits, stride,
                          codes.mutable_data_ptr<int64_t>() + r0);
    }
  });
  return codes;
}

TORCH_LIBRARY_IMPL(fairseq_clustered, CPU, m) { m.impl("lsh_hash", &lsh_hash_cpu); }

}  // namespace fca
