// Schemas of the fairseq_clustered operators, and the Python module that loading them needs.
//
// Implementations: cpu/*.cpp (TORCH_LIBRARY_IMPL CPU); the GPU kernels are Triton, in
// fairseq_plugin/ops/triton/. Autograd, fake (meta) kernels and the Python API live in
// fairseq_plugin/ops/compiled.py; the PyTorch reference of every operator is in
// fairseq_plugin/ops/ (the oracle of the tests and the fallback when this extension is missing).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/cpu_common.h"

TORCH_LIBRARY(fairseq_clustered, m) {
  // codes (...) int64: bit b = [x . planes[b, :E] > planes[b, E]]; planes (B, E + 1), B <= 63.
  m.def("lsh_hash(Tensor x, Tensor planes) -> Tensor");
  // Lloyd's k-means in Hamming space; C = init.size(2), iterations = reseed.size(0).
  // -> (assignment (N, H, L) int64, -1 for padded queries; counts (N, H, C) int64)
  m.def(
      "hamming_kmeans(Tensor codes, Tensor init, Tensor reseed, Tensor? padding_mask, int hash_bits)"
      " -> (Tensor, Tensor)");
  // (N, H, L, D) -> (N, H, C, D): per-cluster sums; and its adjoint (N, H, C, D) -> (N, H, L, D).
  m.def("cluster_sum(Tensor x, Tensor assignment, int clusters) -> Tensor");
  m.def("cluster_broadcast(Tensor y, Tensor assignment) -> Tensor");
  // out[n, h, l] = mass[n, h, c] top[n, h, l] + rest[n, h, c], c = assignment[n, h, l] (0 if padded):
  // top (N, H, L, M), mass (N, H, C), rest (N, H, C, M); and its adjoint -> (grad_top, grad_mass, grad_rest).
  m.def("cluster_combine(Tensor top, Tensor mass, Tensor rest, Tensor assignment) -> Tensor");
  m.def("cluster_combine_backward(Tensor grad, Tensor top, Tensor mass, Tensor assignment) -> (Tensor, Tensor, Tensor)");
  // softmax over keys of scaled centroid scores (N, H, C, S) with padded keys at 0, and the
  // min(topk, S) best keys per row, best first -> (attn float32/float64, top int64 (N, H, C, k))
  m.def("softmax_topk(Tensor scores, Tensor? key_padding_mask, int topk) -> (Tensor, Tensor)");
  // softmax_topk of scale * centroids K^T, plus mass = sum_{t in top} attn_t (N, H, C) and
  // rest = sum_{t not in top} attn_t v_t (N, H, C, M): centroids (N, H, C, E), k (N, H, S, E),
  // v (N, H, S, M) -> (attn, top, mass, rest); and its adjoint -> (grad_centroids, grad_k, grad_v).
  // topk = 0: no top-k set, mass = 0 and rest = attn v (clustered attention's per-cluster values).
  m.def(
      "centroid_attention(Tensor centroids, Tensor k, Tensor v, Tensor? key_padding_mask, int topk, float scale)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "centroid_attention_backward(Tensor grad_mass, Tensor grad_rest, Tensor attn, Tensor top, Tensor centroids,"
      " Tensor k, Tensor v, float scale) -> (Tensor, Tensor, Tensor)");
  // centroid_attention for inference (no autograd): -> (top, mass, rest), no (C, S) tensor.
  m.def(
      "centroid_topk(Tensor centroids, Tensor k, Tensor v, Tensor? key_padding_mask, int topk, float scale)"
      " -> (Tensor, Tensor, Tensor)");
  // per query, exact attention over its cluster's top-k keys -> (out (N, H, L, M), weights (N, H, L, k))
  m.def(
      "topk_attention(Tensor q, Tensor k, Tensor v, Tensor assignment, Tensor top, Tensor? key_padding_mask,"
      " float scale) -> (Tensor, Tensor)");
  m.def(
      "topk_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor assignment, Tensor top,"
      " Tensor weights, float scale) -> (Tensor, Tensor, Tensor)");
  // topk_attention followed by cluster_combine, fused for inference (no autograd, no weights):
  // out[n, h, l] = mass[n, h, c] topk_attention(...)[n, h, l] + rest[n, h, c], zero for padded queries.
  m.def(
      "topk_attention_combine(Tensor q, Tensor k, Tensor v, Tensor assignment, Tensor top, Tensor mass,"
      " Tensor rest, Tensor? key_padding_mask, float scale) -> Tensor");
  // The variant of the CPU hot loops this process runs: "avx512", "avx2" or "default" (the best the
  // CPU has, capped by FAIRSEQ_PLUGIN_CPU_ISA=avx2|default).
  m.def("cpu_isa() -> str", []() -> std::string {
    switch (fca::cpu_isa()) {
      case fca::Isa::kAvx512: return "avx512";
      case fca::Isa::kAvx2: return "avx2";
      default: return "default";
    }
  });
}

// `import fairseq_plugin._C` loads this library, which registers the operators above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fairseq_clustered operators", -1, nullptr};
  return PyModule_Create(&module);
}
}
