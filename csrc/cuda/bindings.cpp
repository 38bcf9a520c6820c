// CUDA implementations of the fairseq_clustered operators: check the tensors, lay them out,
// and call the launchers of kernels.h on the current stream. Built only where torch has CUDA
// (setup.py). Nothing here synchronises with the host: no .item(), no host-side range checks
// of index tensors (the CPU kernels check those; here they come from the other operators).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels.h"

namespace fca {
namespace {

using cuda::DType;

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float16, bfloat16, float32 or float64 on CUDA, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fairseq_clustered::", what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void check_index(const at::Tensor& t, const char* name, at::IntArrayRef sizes) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
}

at::Tensor checked_mask(const std::optional<at::Tensor>& mask, const at::Tensor& like, int64_t n, int64_t s,
                        const char* name) {
  if (!mask.has_value()) return at::Tensor();
  check_cuda(*mask, like, name);
  TORCH_CHECK(mask->scalar_type() == at::kBool, name, " must be bool, got ", mask->scalar_type());
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == n && mask->size(1) == s, name, " must have shape (N, S) = (", n,
              ", ", s, "), got ", mask->sizes());
  return mask->contiguous();
}

const bool* mask_ptr(const at::Tensor& mask) { return mask.defined() ? mask.const_data_ptr<bool>() : nullptr; }

// Members of every cluster, sorted by cluster (padded queries last): order (N, H, L) and
// offsets (N, H, C + 1), with ATen ops on the current stream.
std::pair<at::Tensor, at::Tensor> group_by_cluster(const at::Tensor& assignment, int64_t clusters) {
  const at::Tensor key = assignment.masked_fill(assignment < 0, clusters);
  const at::Tensor order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/-1, /*descending=*/false)).contiguous();
  at::Tensor sizes = at::zeros({assignment.size(0), assignment.size(1), clusters + 1}, assignment.options());
  sizes.scatter_add_(2, key, at::ones_like(key));
  const at::Tensor offsets = at::cat({at::zeros_like(sizes.narrow(2, 0, 1)), sizes.narrow(2, 0, clusters).cumsum(2)}, 2);
  return {order, offsets.contiguous()};
}

at::Tensor lsh_hash_cuda(const at::Tensor& x, const at::Tensor& planes) {
  TORCH_CHECK(x.dim() >= 1 && planes.dim() == 2, "x must be (..., E) and planes (hash_bits, E + 1)");
  check_cuda(planes, x, "planes");
  const int64_t dim = x.size(-1), bits = planes.size(0);
  TORCH_CHECK(planes.size(1) == dim + 1, "planes must have shape (hash_bits, E + 1) with E = ", dim, ", got ",
              planes.sizes());
  TORCH_CHECK(bits >= 1 && bits <= 63, "hash_bits (planes.size(0)) must be in 1..63, got ", bits);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto compute = at::promote_types(x.scalar_type(), at::kFloat);
  const at::Tensor proj = at::matmul(x.to(compute), planes.narrow(1, 0, dim).to(compute).t()).contiguous();
  const at::Tensor offsets = planes.select(1, dim).to(compute).contiguous();
  auto sizes = x.sizes().vec();
  sizes.pop_back();
  at::Tensor codes = at::empty(sizes, x.options().dtype(at::kLong));
  check_launch(cuda::pack_codes(proj.const_data_ptr(), offsets.const_data_ptr(), dtype_of(proj, "x"), codes.numel(),
                                bits, codes.mutable_data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream()),
               "lsh_hash");
  return codes;
}

std::tuple<at::Tensor, at::Tensor> hamming_kmeans_cuda(const at::Tensor& codes_in, const at::Tensor& init_in,
                                                       const at::Tensor& reseed_in,
                                                       const std::optional<at::Tensor>& padding_mask,
                                                       int64_t hash_bits) {
  TORCH_CHECK(codes_in.dim() == 3 && codes_in.scalar_type() == at::kLong, "codes must be int64 (N, H, L), got ",
              codes_in.scalar_type(), " ", codes_in.sizes());
  TORCH_CHECK(hash_bits >= 1 && hash_bits <= 63, "hash_bits must be in 1..63, got ", hash_bits);
  const int64_t n = codes_in.size(0), h = codes_in.size(1), length = codes_in.size(2);
  TORCH_CHECK(init_in.dim() == 3, "init must have shape (N, H, C), got ", init_in.sizes());
  const int64_t clusters = init_in.size(2);
  TORCH_CHECK(clusters >= 1 && clusters <= length, "clusters (init.size(2)) must be in 1..L = 1..", length, ", got ",
              clusters);
  TORCH_CHECK(clusters <= 4096, "clusters must be <= 4096 on CUDA (centroids live in shared memory), got ", clusters);
  check_index(init_in, "init", {n, h, clusters});
  TORCH_CHECK(reseed_in.dim() == 4, "reseed must have shape (iterations, N, H, C), got ", reseed_in.sizes());
  check_index(reseed_in, "reseed", {reseed_in.size(0), n, h, clusters});
  check_cuda(init_in, codes_in, "init");
  check_cuda(reseed_in, codes_in, "reseed");
  const at::Tensor padded = checked_mask(padding_mask, codes_in, n, length, "padding_mask");
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous(), init = init_in.contiguous(), reseed = reseed_in.contiguous();
  at::Tensor assignment = at::empty({n, h, length}, codes.options());
  at::Tensor counts = at::zeros({n, h, clusters}, codes.options());
  const int64_t scratch_size = cuda::kmeans_scratch(n * h, clusters);
  at::Tensor scratch = at::empty({scratch_size}, codes.options().dtype(at::kInt));
  check_launch(cuda::hamming_kmeans(codes.const_data_ptr<int64_t>(), init.const_data_ptr<int64_t>(),
                                    reseed.const_data_ptr<int64_t>(), mask_ptr(padded), n, h, length, clusters,
                                    reseed.size(0), hash_bits, assignment.mutable_data_ptr<int64_t>(),
                                    counts.mutable_data_ptr<int64_t>(),
                                    scratch_size > 0 ? scratch.mutable_data_ptr<int32_t>() : nullptr,
                                    at::cuda::getCurrentCUDAStream()),
               "hamming_kmeans");
  return {assignment, counts};
}

at::Tensor cluster_sum_cuda(const at::Tensor& x_in, const at::Tensor& assignment_in, int64_t clusters) {
  TORCH_CHECK(x_in.dim() == 4, "x must have shape (N, H, L, D), got ", x_in.sizes());
  TORCH_CHECK(clusters >= 1, "clusters must be >= 1, got ", clusters);
  const int64_t n = x_in.size(0), h = x_in.size(1), length = x_in.size(2), d = x_in.size(3);
  check_cuda(assignment_in, x_in, "assignment");
  check_index(assignment_in, "assignment", {n, h, length});
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  auto [order, offsets] = group_by_cluster(assignment_in.contiguous(), clusters);
  at::Tensor out = at::empty({n, h, clusters, d}, x.options());
  check_launch(cuda::cluster_sum(x.const_data_ptr(), dtype_of(x, "x"), order.const_data_ptr<int64_t>(),
                                 offsets.const_data_ptr<int64_t>(), n * h, length, clusters, d, out.mutable_data_ptr(),
                                 at::cuda::getCurrentCUDAStream()),
               "cluster_sum");
  return out;
}

at::Tensor cluster_broadcast_cuda(const at::Tensor& y_in, const at::Tensor& assignment_in) {
  TORCH_CHECK(y_in.dim() == 4, "y must have shape (N, H, C, D), got ", y_in.sizes());
  const int64_t n = y_in.size(0), h = y_in.size(1), clusters = y_in.size(2), d = y_in.size(3);
  check_cuda(assignment_in, y_in, "assignment");
  TORCH_CHECK(assignment_in.dim() == 3, "assignment must have shape (N, H, L), got ", assignment_in.sizes());
  const int64_t length = assignment_in.size(2);
  check_index(assignment_in, "assignment", {n, h, length});
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous(), assignment = assignment_in.contiguous();
  at::Tensor out = at::empty({n, h, length, d}, y.options());
  check_launch(cuda::cluster_broadcast(y.const_data_ptr(), dtype_of(y, "y"), assignment.const_data_ptr<int64_t>(),
                                       n * h, length, clusters, d, out.mutable_data_ptr(),
                                       at::cuda::getCurrentCUDAStream()),
               "cluster_broadcast");
  return out;
}

std::tuple<at::Tensor, at::Tensor> softmax_topk_cuda(const at::Tensor& scores,
                                                     const std::optional<at::Tensor>& key_padding_mask,
                                                     int64_t topk) {
  TORCH_CHECK(scores.dim() == 4, "scores must have shape (N, H, C, S), got ", scores.sizes());
  TORCH_CHECK(topk >= 1, "topk must be >= 1, got ", topk);
  const int64_t n = scores.size(0), h = scores.size(1), c = scores.size(2), s = scores.size(3);
  TORCH_CHECK(s >= 1, "scores need at least one key, got S = 0");
  dtype_of(scores, "scores");
  const at::Tensor padded = checked_mask(key_padding_mask, scores, n, s, "key_padding_mask");
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t k = std::min(topk, s);
  const at::Tensor masked =
      padded.defined() ? scores.masked_fill(padded.view({n, 1, 1, s}), -std::numeric_limits<double>::infinity())
                       : scores;
  const at::Tensor attn = at::softmax(masked, -1, at::promote_types(scores.scalar_type(), at::kFloat)).contiguous();
  at::Tensor top = at::empty({n, h, c, k}, scores.options().dtype(at::kLong));
  check_launch(cuda::topk_select(attn.const_data_ptr(), dtype_of(attn, "attn"), mask_ptr(padded), n, h * c, s, k,
                                 top.mutable_data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream()),
               "softmax_topk");
  return {attn, top};
}

cuda::TopkShapes topk_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& assignment, const at::Tensor& top) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k and v must be (N, H, L|S, E|M)");
  TORCH_CHECK(top.dim() == 4, "top must have shape (N, H, C, topk), got ", top.sizes());
  cuda::TopkShapes sh{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3), top.size(2), top.size(3)};
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sizes() == at::IntArrayRef({sh.n, sh.h, sh.s, sh.e}), "k must have shape (N, H, S, E) = (", sh.n,
              ", ", sh.h, ", S, ", sh.e, "), got ", k.sizes());
  TORCH_CHECK(v.size(0) == sh.n && v.size(1) == sh.h && v.size(2) == sh.s, "v must have shape (N, H, S, M), got ",
              v.sizes());
  check_index(assignment, "assignment", {sh.n, sh.h, sh.length});
  TORCH_CHECK(top.scalar_type() == at::kLong && top.size(0) == sh.n && top.size(1) == sh.h && sh.k >= 1 &&
                  sh.k <= sh.s && sh.clusters >= 1,
              "top must be int64 (N, H, C, topk) with 1 <= topk <= S = ", sh.s, ", got ", top.sizes());
  for (const auto* t : {&k, &v, &assignment, &top}) check_cuda(*t, q, "q, k, v, assignment and top");
  const int64_t need = cuda::topk_attention_smem(sh, true, dtype_of(q, "q"));
  int device = q.get_device(), limit = 0;
  cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  TORCH_CHECK(need <= limit, "topk=", sh.k, " with E=", sh.e, " and M=", sh.m, " needs ", need,
              " bytes of shared memory per block, more than this GPU's ", limit, "; lower --topk");
  return sh;
}

std::tuple<at::Tensor, at::Tensor> topk_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, const at::Tensor& assignment_in,
                                                       const at::Tensor& top_in,
                                                       const std::optional<at::Tensor>& key_padding_mask,
                                                       double scale) {
  const cuda::TopkShapes sh = topk_shapes(q_in, k_in, v_in, assignment_in, top_in);
  const at::Tensor padded = checked_mask(key_padding_mask, q_in, sh.n, sh.s, "key_padding_mask");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), top = top_in.contiguous();
  auto [order, offsets] = group_by_cluster(assignment_in.contiguous(), sh.clusters);
  at::Tensor out = at::zeros({sh.n, sh.h, sh.length, sh.m}, q.options());
  at::Tensor weights =
      at::zeros({sh.n, sh.h, sh.length, sh.k}, q.options().dtype(at::promote_types(q.scalar_type(), at::kFloat)));
  check_launch(cuda::topk_attention_forward(q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
                                            dtype_of(q, "q"), order.const_data_ptr<int64_t>(),
                                            offsets.const_data_ptr<int64_t>(), top.const_data_ptr<int64_t>(),
                                            mask_ptr(padded), sh, scale, out.mutable_data_ptr(),
                                            weights.mutable_data_ptr(), at::cuda::getCurrentCUDAStream()),
               "topk_attention");
  return {out, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_attention_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& assignment_in, const at::Tensor& top_in, const at::Tensor& weights_in, double scale) {
  const cuda::TopkShapes sh = topk_shapes(q_in, k_in, v_in, assignment_in, top_in);
  const auto acc = at::promote_types(q_in.scalar_type(), at::kFloat);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({sh.n, sh.h, sh.length, sh.m}) &&
                  grad_in.scalar_type() == q_in.scalar_type(),
              "grad_out must have the shape (N, H, L, M) and dtype of the output, got ", grad_in.sizes(), " ",
              grad_in.scalar_type());
  TORCH_CHECK(weights_in.sizes() == at::IntArrayRef({sh.n, sh.h, sh.length, sh.k}) && weights_in.scalar_type() == acc,
              "weights must be ", acc, " (N, H, L, topk), got ", weights_in.scalar_type(), " ", weights_in.sizes());
  check_cuda(grad_in, q_in, "grad_out");
  check_cuda(weights_in, q_in, "weights");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor grad = grad_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor top = top_in.contiguous(), weights = weights_in.contiguous();
  auto [order, offsets] = group_by_cluster(assignment_in.contiguous(), sh.clusters);
  at::Tensor gq = at::zeros_like(q);
  at::Tensor gk = at::zeros(k.sizes(), k.options().dtype(acc)), gv = at::zeros(v.sizes(), v.options().dtype(acc));
  check_launch(cuda::topk_attention_backward(grad.const_data_ptr(), q.const_data_ptr(), k.const_data_ptr(),
                                             v.const_data_ptr(), dtype_of(q, "q"), weights.const_data_ptr(),
                                             order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
                                             top.const_data_ptr<int64_t>(), sh, scale, gq.mutable_data_ptr(),
                                             gk.mutable_data_ptr(), gv.mutable_data_ptr(),
                                             at::cuda::getCurrentCUDAStream()),
               "topk_attention_backward");
  return {gq, gk.to(q.scalar_type()), gv.to(q.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fairseq_clustered, CUDA, m) {
  m.impl("lsh_hash", &lsh_hash_cuda);
  m.impl("hamming_kmeans", &hamming_kmeans_cuda);
  m.impl("cluster_sum", &cluster_sum_cuda);
  m.impl("cluster_broadcast", &cluster_broadcast_cuda);
  m.impl("softmax_topk", &softmax_topk_cuda);
  m.impl("topk_attention", &topk_attention_cuda);
  m.impl("topk_attention_backward", &topk_attention_backward_cuda);
}

}  // namespace fca
