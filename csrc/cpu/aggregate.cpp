// Cluster aggregation and broadcast (DESIGN.md §2, steps 3-4): the two linear maps between
// per-query rows (N, H, L, D) and per-cluster rows (N, H, C, D). They are each other's adjoint,
// so each one's backward is the other (registered in fairseq_plugin/ops/compiled.py). And the
// improved-clustered combination m̂·top + rest, which broadcasts two per-cluster terms at once.
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

namespace {

// One query row of the combination: out = mass * top + rest (d values).
template <typename T, int VB>
FCA_INLINE void combine_row_body(const T* top, T mass, const T* rest, int64_t d, T* out) {
  for (int64_t e = 0; e < d; ++e) out[e] = mass * top[e] + rest[e];
}
FCA_MULTIVERSION(combine_row)

// One (n, h) row of the combination's backward, members in order (deterministic):
// grad_top[l] = mass[c] g[l]; grad_mass[c] += g[l] . top[l]; grad_rest[c] += g[l].
template <typename T, int VB>
FCA_INLINE void combine_backward_row_body(const T* g, const T* top, const T* mass, const int64_t* a, int64_t length,
                                          int64_t clusters, int64_t d, T* grad_top, T* grad_mass, T* grad_rest) {
  for (int64_t l = 0; l < length; ++l) {
    const int64_t c = a[l];
    const T* gl = g + l * d;
    T* gt = grad_top + l * d;
    if (c < 0) {
      std::fill(gt, gt + d, T(0));
      continue;
    }
    TORCH_CHECK(c < clusters, "assignment holds cluster ", c, " >= clusters = ", clusters);
    const T m = mass[c];
    const T* tl = top + l * d;
    T* gr = grad_rest + c * d;
    T dot = T(0);
    for (int64_t e = 0; e < d; ++e) {
      gt[e] = m * gl[e];
      gr[e] += gl[e];
      dot += gl[e] * tl[e];
    }
    grad_mass[c] += dot;
  }
}
FCA_MULTIVERSION(combine_backward_row)

void check_combine(const at::Tensor& top, const at::Tensor& mass, const at::Tensor& assignment, const char* name) {
  check_dim(top, 4, name, "(N, H, L, M)");
  check_float(top, name);
  check_dim(mass, 3, "mass", "(N, H, C)");
  check_assignment(top, assignment, name);
  TORCH_CHECK(mass.scalar_type() == top.scalar_type(), "mass must have ", name, "'s dtype ", top.scalar_type(),
              ", got ", mass.scalar_type());
  TORCH_CHECK(mass.size(0) == top.size(0) && mass.size(1) == top.size(1), "mass must have shape (N, H, C) = (",
              top.size(0), ", ", top.size(1), ", C), got ", mass.sizes());
  TORCH_CHECK(assignment.sizes() == top.sizes().slice(0, 3), "assignment must have shape (N, H, L) = ",
              top.sizes().slice(0, 3), ", got ", assignment.sizes());
}

}  // namespace

// out[n, h, l] = mass[n, h, c] top[n, h, l] + rest[n, h, c], c = assignment[n, h, l]: the
// improved-clustered output m̂·(top-k attention) + Σ_{t∉T} A^c_t v_t in one pass, instead of two
// broadcasts and an addcmul; zero for padded queries (assignment -1).
at::Tensor cluster_combine_cpu(const at::Tensor& top_in, const at::Tensor& mass_in, const at::Tensor& rest_in,
                               const at::Tensor& assignment_in) {
  check_combine(top_in, mass_in, assignment_in, "top");
  check_dim(rest_in, 4, "rest", "(N, H, C, M)");
  TORCH_CHECK(rest_in.scalar_type() == top_in.scalar_type(), "rest must have top's dtype ", top_in.scalar_type(),
              ", got ", rest_in.scalar_type());
  const int64_t n = top_in.size(0), h = top_in.size(1), length = top_in.size(2), d = top_in.size(3);
  const int64_t clusters = mass_in.size(2);
  TORCH_CHECK(rest_in.size(0) == n && rest_in.size(1) == h && rest_in.size(2) == clusters && rest_in.size(3) == d,
              "rest must have shape (N, H, C, M) = (", n, ", ", h, ", ", clusters, ", ", d, "), got ",
              rest_in.sizes());
  const at::Tensor top = top_in.contiguous(), mass = mass_in.contiguous(), rest = rest_in.contiguous();
  const at::Tensor assignment = assignment_in.contiguous();
  at::Tensor out = at::empty_like(top);
  AT_DISPATCH_FLOATING_TYPES(top.scalar_type(), "cluster_combine", [&] {
    const scalar_t* t = top.const_data_ptr<scalar_t>();
    const scalar_t* ms = mass.const_data_ptr<scalar_t>();
    const scalar_t* rs = rest.const_data_ptr<scalar_t>();
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
        const int64_t r = i / length;
        combine_row<scalar_t>(t + i * d, ms[r * clusters + c], rs + (r * clusters + c) * d, d, row);
      }
    });
  });
  return out;
}

// The adjoint of cluster_combine -> (grad_top (N, H, L, M), grad_mass (N, H, C), grad_rest (N, H, C, M)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_combine_backward_cpu(const at::Tensor& grad_in,
                                                                            const at::Tensor& top_in,
                                                                            const at::Tensor& mass_in,
                                                                            const at::Tensor& assignment_in) {
  check_combine(top_in, mass_in, assignment_in, "top");
  TORCH_CHECK(grad_in.sizes() == top_in.sizes() && grad_in.scalar_type() == top_in.scalar_type(),
              "grad must match top (", top_in.sizes(), ", ", top_in.scalar_type(), "), got ", grad_in.sizes(), ", ",
              grad_in.scalar_type());
  const int64_t n = top_in.size(0), h = top_in.size(1), length = top_in.size(2), d = top_in.size(3);
  const int64_t clusters = mass_in.size(2);
  const at::Tensor grad = grad_in.contiguous(), top = top_in.contiguous(), mass = mass_in.contiguous();
  const at::Tensor assignment = assignment_in.contiguous();
  at::Tensor grad_top = at::empty_like(top);
  at::Tensor grad_mass = at::zeros_like(mass);
  at::Tensor grad_rest = at::zeros({n, h, clusters, d}, top.options());
  AT_DISPATCH_FLOATING_TYPES(top.scalar_type(), "cluster_combine_backward", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* t = top.const_data_ptr<scalar_t>();
    const scalar_t* ms = mass.const_data_ptr<scalar_t>();
    const int64_t* a = assignment.const_data_ptr<int64_t>();
    scalar_t* gt = grad_top.mutable_data_ptr<scalar_t>();
    scalar_t* gm = grad_mass.mutable_data_ptr<scalar_t>();
    scalar_t* gr = grad_rest.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * h, grain_for(length * d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        combine_backward_row<scalar_t>(g + r * length * d, t + r * length * d, ms + r * clusters, a + r * length,
                                       length, clusters, d, gt + r * length * d, gm + r * clusters,
                                       gr + r * clusters * d);
    });
  });
  return {grad_top, grad_mass, grad_rest};
}

TORCH_LIBRARY_IMPL(fairseq_clustered, CPU, m) {
  m.impl("cluster_sum", &cluster_sum_cpu);
  m.impl("cluster_broadcast", &cluster_broadcast_cpu);
  m.impl("cluster_combine", &cluster_combine_cpu);
  m.impl("cluster_combine_backward", &cluster_combine_backward_cpu);
}

}  // namespace fca
