// Cluster aggregation and broadcast (DESIGN.md §2, steps 3-4): the two linear maps between
// per-query rows (N, H, L, D) and per-cluster rows (N, H, C, D). They are each other's adjoint,
// so each one's backward is the other (registered in fairseq_plugin/ops/compiled.py).
#include "cpu_common.h"

#include <torch/library.h>

namespace fca {
namespace {

void check_assignment(const at::Tensor& x, const at::Tensor& assignment, const char* xname) {
  check_dim(assignment, 3, "assignment", "(N, H, L)");
  check_index(assignment, "assignment");
  check_same_device(x, assignment, xname, "assignment");
}

}  // namespace

// sums[n, h, c] = sum of x[n, h, l] over the queries l with assignment c (padded: -1, skipped).
at::Tensor cluster_sum_cpu(const at::Tensor& x_in, const at::Tensor& assignment_in, int64_t clusters) {
  check_dim(x_in, 4, "x", "(N, H, L, D)");
  check_float(x_in, "x");
  check_assignment(x_in, assignment_in, "x");
  TORCH_CHECK(clusters >= 1, "clusters must be >= 1, got ", clusters);
  const int64_t n = x_in.size(0), h = x_in.size(1), length = x_in.size(2), d = x_in.size(3);
  TORCH_CHECK(assignment_in.size(0) == n && assignment_in.size(1) == h && assignment_in.size(2) == length,
              "assignment must have shape (N, H, L) = (", n, ", ", h, ", ", length, "), got ", assignment_in.sizes());
  const at::Tensor x = x_in.contiguous(), assignment = assignment_in.contiguous();
  at::Tensor sums = at::zeros({n, h, clusters, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cluster_sum", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    const int64_t* a = assignment.const_data_ptr<int64_t>();
    scalar_t* dst = sums.mutable_data_ptr<scalar_t>();
    // One (n, h) per task, members in order: deterministic.
    at::parallel_for(0, n * h, grain_for(length * d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t l = 0; l < length; ++l) {
          const int64_t c = a[r * length + l];
          if (c < 0) continue;
          TORCH_CHECK(c < clusters, "assignment holds cluster ", c, " >= clusters = ", clusters);
          scalar_t* out = dst + (r * clusters + c) * d;
          const scalar_t* row = src + (r * length + l) * d;
          for (int64_t e = 0; e < d; ++e) out[e] += row[e];
        }
    });
  });
  return sums;
}

// out[n, h, l] = y[n, h, assignment[n, h, l]], zero for padded queries (assignment -1).
at::Tensor cluster_broadcast_cpu(const at::Tensor& y_in, const at::Tensor& assignment_in) {
  check_dim(y_in, 4, "y", "(N, H, C, D)");
  check_float(y_in, "y");
  check_assignment(y_in, assignment_in, "y");
  const int64_t n = y_in.size(0), h = y_in.size(1), clusters = y_in.size(2), d = y_in.size(3);
  TORCH_CHECK(assignment_in.size(0) == n && assignment_in.size(1) == h,
              "assignment must have shape (N, H, L) with (N, H) = (", n, ", ", h, "), got ", assignment_in.sizes());
  const int64_t length = assignment_in.size(2);
  const at::Tensor y = y_in.contiguous(), assignment = assignment_in.contiguous();
  at::Tensor out = at::empty({n, h, length, d}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "cluster_broadcast", [&] {
    const scalar_t* src = y.const_data_ptr<scalar_t>();
    const int64_t* a = assignment.const_data_ptr<int64_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * h * length, grain_for(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = a[i];
        scalar_t* row = dst + i * d;
        if (c < 0) {
          std::fill(row, row + d, scalar_t(0));
          continue;
        }
        TORCH_CHECK(c < clusters, "assignment holds cluster ", c, " >= clusters = ", clusters);
        const scalar_t* from = src + ((i / length) * clusters + c) * d;
        std::copy(from, from + d, row);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(fairseq_clustered, CPU, m) {
  m.impl("cluster_sum", &cluster_sum_cpu);
  m.impl("cluster_broadcast", &cluster_broadcast_cpu);
}

}  // namespace fca
