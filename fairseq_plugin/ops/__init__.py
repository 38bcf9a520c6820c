"""The functional attention API: full, clustered, improved-clustered and hardmax attention.

Tensors are (N, H, L, E) queries, (N, H, S, E) keys and (N, H, S, M) values; see
docs/ops-api.md. These are the PyTorch reference implementations (the oracle for the compiled
kernels of csrc/, and their fallback). Nothing here imports fairseq.
"""

from .backend import implementation
from .clustered import ClusterInfo, clustered_attention, full_attention, improved_clustered_attention
from .hardmax import HardmaxInfo, hardmax_attention
from .hashing import draw_planes, lsh_hash
from .kmeans import hamming_kmeans

__all__ = [
    "ClusterInfo",
    "HardmaxInfo",
    "clustered_attention",
    "draw_planes",
    "full_attention",
    "hamming_kmeans",
    "hardmax_attention",
    "implementation",
    "improved_clustered_attention",
    "lsh_hash",
]
