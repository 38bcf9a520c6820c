"""The GPU kernels, in Triton: one op family a file, each beside its PyTorch reference in ``ops/``.

Files (each registers its ops as ``torch.library.custom_op`` under the namespace
``fairseq_clustered_triton``, with ``register_fake`` and, where differentiable,
``register_autograd``):

* ``hashing.py``: LSH hashing, projection + threshold + packing into int64 codes;
* ``kmeans.py``: Hamming k-means parallel over chunks of queries, whose last pass also emits the
  counts and a counting-sort ``order`` / ``offsets`` of the queries by cluster;
* ``aggregate.py``: ``cluster_sum`` (fp32 accumulation) and ``cluster_broadcast``, each other's
  adjoint;
* ``topk.py``, ``sparse.py``: centroid softmax + top-k, and the top-k attention forward/backward.

Nothing here imports triton at package import; the ops modules import a kernel file only when
:func:`fairseq_plugin.ops.backend.implementation` says ``"triton"``. Under ``TRITON_INTERPRET=1``
and ``FAIRSEQ_PLUGIN_TRITON_ON_CPU=1`` the kernels run on CPU tensors in Triton's interpreter (the
tests); both variables must be set before triton is first imported.

Why ``custom_op`` and not ``triton_op``: under the interpreter, ``torch.compile`` of a
``triton_op`` hands fake tensors to the interpreted kernel and fails; a ``custom_op`` around the
launch, with a fake kernel, compiles and passes ``opcheck`` there (DESIGN.md §4).

**CONFIGS** (read by ``experiments/benchmarks/compile_kernels.py``): every kernel file defines a
module-level list ``CONFIGS`` holding one dict per kernel configuration the dispatcher can
choose, so that the ahead-of-time compile check covers exactly what can run::

    CONFIGS = [
        {
            "kernel": _assign_kernel,                # the @triton.jit function
            "signature": {"codes": "*i64", "n_rows": "i32", ...},  # runtime arguments, by name
            "constexprs": {"BLOCK_L": 128, "C_PAD": 128},  # tl.constexpr arguments, by name
            "num_warps": 4,                          # optional (default 4)
            "num_stages": 3,                         # optional (default 3)
            "tile_products": False,                  # optional: True when the kernel uses tl.dot,
                                                     #   so sm_90 must show wgmma, sm_80 mma
            "ptx_required": ("popc.b32",),           # optional: instructions the PTX must hold
        },
        ...
    ]

Signature types are Triton's strings: ``*fp16``, ``*bf16``, ``*fp32``, ``*i32``, ``*i64``, ``i32``,
``i64``, ``fp32``. A file defines ``CONFIGS`` without launching anything, so importing it (with
triton installed) is cheap.
"""
