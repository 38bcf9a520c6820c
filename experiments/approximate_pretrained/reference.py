"""A plain-torch BERT forward straight from ``model.safetensors``: the original model.

Written from the BERT definition (Devlin et al. 2019; the HF ``BertModel`` layout the file's names
follow), independently of the converter in :mod:`minilm` and of fairseq: it reads the tensors by
their BERT names and applies them with ``torch.nn.functional`` only. Followed by the
sentence-transformers pooling of the package (mean over real tokens, then L2 normalisation).
This stands in for ``sentence-transformers`` / ``transformers``, which are not installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_embeddings(folder: Path, tokens: Tensor, normalize: bool = True) -> Tensor:
    """tokens: (N, T) int64 ids right-padded with the config's pad id -> (N, hidden) embeddings."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(folder) / "config.json").read_text())
    w = load_file(str(Path(folder) / "model.safetensors"))
    eps, heads, pad = cfg["layer_norm_eps"], cfg["num_attention_heads"], cfg["pad_token_id"]
    n, t = tokens.shape
    mask = tokens.ne(pad)  # (N, T) True = real token

    def dense(x: Tensor, name: str) -> Tensor:
        return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])

    def norm(x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)

    x = w["embeddings.word_embeddings.weight"][tokens]
    x = x + w["embeddings.token_type_embeddings.weight"][torch.zeros_like(tokens)]
    x = x + w["embeddings.position_embeddings.weight"][torch.arange(t)].unsqueeze(0)
    x = norm(x, "embeddings.LayerNorm")  # (N, T, D)
    d = x.shape[-1] // heads
    bias = torch.zeros(n, 1, 1, t).masked_fill(~mask[:, None, None, :], float("-inf"))  # padded keys
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"

        def split(y: Tensor) -> Tensor:
            return y.view(n, t, heads, d).transpose(1, 2)  # (N, H, T, d)

        q = split(dense(x, f"{p}.attention.self.query"))
        k = split(dense(x, f"{p}.attention.self.key"))
        v = split(dense(x, f"{p}.attention.self.value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)  # (N, H, T, T)
        ctx = (probs @ v).transpose(1, 2).reshape(n, t, heads * d)  # (N, T, D)
        x = norm(dense(ctx, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        h = F.gelu(dense(x, f"{p}.intermediate.dense"))  # erf GELU, BERT's "gelu"
        x = norm(dense(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    m = mask.unsqueeze(-1).to(x.dtype)
    pooled = (x * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, p=2, dim=1) if normalize else pooled
