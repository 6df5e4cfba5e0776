"""A model's shape: what the memory and speed model needs from its config.json, and the shapes known by name.

Only the architecture matters (weights, optimizer states and activations scale with it); the values are read from
a Hugging Face `config.json` (`ModelShape.from_config`) or taken from `KNOWN_SHAPES` when the operator cannot read
the model's files (a `pvc://` model on a real cluster: `spec.model.architecture` names one).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional

# Decoder-only architectures whose layers are Llama-shaped (q/k/v/o attention with GQA, gated MLP, RMSNorm): the
# memory model's activation terms are calibrated on these. Anything else is refused with the model_type named.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")
QKV_BIAS_MODEL_TYPES = ("qwen2",)


class ShapeError(ValueError):
    """config.json is missing, unreadable or describes an architecture the planner does not model."""


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False
    max_position_embeddings: Optional[int] = None
    name: Optional[str] = None  # a KNOWN_SHAPES key, where it came from there

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: Optional[str] = None) -> "ModelShape":
        model_type = str(config.get("model_type") or "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ShapeError(f"model_type {model_type or '(none)'!r} is not supported by the memory planner "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            shape = cls(
                model_type=model_type, hidden_size=hidden, intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]), num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads), vocab_size=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=bool(config.get("attention_bias", model_type in QKV_BIAS_MODEL_TYPES)),
                max_position_embeddings=config.get("max_position_embeddings"), name=name)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
            raise ShapeError(f"config.json lacks a usable {err} for a {model_type} model") from None
        if min(shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.num_heads, shape.vocab_size) <= 0:
            raise ShapeError("config.json has a zero or negative size")
        return shape

    @classmethod
    def from_file(cls, path: Path) -> "ModelShape":
        try:
            config = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ShapeError(f"{path} does not exist (a model directory needs config.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ShapeError(f"{path} is not readable JSON ({type(err).__name__}: {err})") from None
        if not isinstance(config, dict):
            raise ShapeError(f"{path} is not a JSON object")
        return cls.from_config(config)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    # --- parameter tensors ---------------------------------------------------------------------------------------
    def tensor_sizes(self) -> list[int]:
        """numel of every trainable tensor (tied embeddings counted once), in no particular order."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        layer = [h * q, h * kv, h * kv, q * h, h * i, h * i, i * h, h, h]
        if self.qkv_bias:
            layer += [q, kv, kv]
        sizes = layer * self.num_layers + [self.vocab_size * h, h]
        if not self.tied_embeddings:
            sizes.append(self.vocab_size * h)
        return sizes

    @property
    def parameters(self) -> int:
        return _parameters(self)

    @property
    def decoder_parameters(self) -> int:
        """Parameters of the decoder layers (the matmuls every token goes through, recomputed when checkpointed)."""
        return self.parameters - self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2) \
            - self.hidden_size

    @property
    def largest_tensor(self) -> int:
        return max(self.tensor_sizes())

    def layer_activation_per_token(self) -> int:
        """bf16 bytes one decoder layer saves for backward per token without checkpointing: norms, q/k/v,
        attention output, residuals and three MLP-wide tensors."""
        h, i = self.hidden_size, self.intermediate_size
        return 2 * (7 * h + 2 * self.num_kv_heads * self.head_dim + 3 * i)


@lru_cache(maxsize=256)
def _parameters(shape: ModelShape) -> int:
    return sum(shape.tensor_sizes())


def eight_bit_state_bytes(numel: int) -> int:
    """bitsandbytes AdamW8bit states of one tensor: two uint8 states plus two fp32 absmax per 256-value block;
    tensors under 4096 values keep fp32 states."""
    return 2 * numel + 8 * math.ceil(numel / 256) if numel >= 4096 else 8 * numel


def _shape(model_type: str, h: int, i: int, layers: int, heads: int, kv: int, vocab: int, tied: bool,
           max_pos: int, name: str) -> ModelShape:
    return ModelShape(model_type=model_type, hidden_size=h, intermediate_size=i, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv, head_dim=h // heads, vocab_size=vocab,
                      tied_embeddings=tied, qkv_bias=model_type in QKV_BIAS_MODEL_TYPES,
                      max_position_embeddings=max_pos, name=name)


# The shapes of public checkpoints (their config.json values), for models whose files the operator cannot read.
KNOWN_SHAPES: dict[str, ModelShape] = {s.name: s for s in (
    _shape("llama", 4096, 14336, 32, 32, 8, 128256, False, 131072, "llama-3.1-8b"),
    _shape("llama", 3072, 8192, 28, 24, 8, 128256, True, 131072, "llama-3.2-3b"),
    _shape("llama", 2048, 8192, 16, 32, 8, 128256, True, 131072, "llama-3.2-1b"),
    _shape("qwen2", 3584, 18944, 28, 28, 4, 152064, False, 32768, "qwen2.5-7b"),
    _shape("qwen2", 2048, 11008, 36, 16, 2, 151936, True, 32768, "qwen2.5-3b"),
    _shape("qwen2", 1536, 8960, 28, 12, 2, 151936, True, 32768, "qwen2.5-1.5b"),
    _shape("qwen2", 896, 4864, 24, 14, 2, 151936, True, 32768, "qwen2.5-0.5b"),
    _shape("mistral", 4096, 14336, 32, 32, 8, 32768, False, 32768, "mistral-7b-v0.3"),
)}

# Hub repositories (lower-case, without the organisation's spelling variants) -> known shape; Instruct variants
# share the base model's shape.
_HUB_NAMES = {
    "meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.2-3b": "llama-3.2-3b", "meta-llama/llama-3.2-1b": "llama-3.2-1b",
    "qwen/qwen2.5-7b": "qwen2.5-7b", "qwen/qwen2.5-3b": "qwen2.5-3b", "qwen/qwen2.5-1.5b": "qwen2.5-1.5b",
    "qwen/qwen2.5-0.5b": "qwen2.5-0.5b", "mistralai/mistral-7b-v0.3": "mistral-7b-v0.3",
    "unsloth/meta-llama-3.1-8b": "llama-3.1-8b", "unsloth/llama-3.1-8b": "llama-3.1-8b",
    "unsloth/qwen2.5-7b": "qwen2.5-7b", "unsloth/qwen2.5-1.5b": "qwen2.5-1.5b",
}


def known_shape_for_repo(repo_id: str) -> Optional[ModelShape]:
    """The known shape of a hub repository id (ORG/NAME, an -Instruct suffix allowed), or None."""
    key = repo_id.lower().split("@", 1)[0]
    for suffix in ("-instruct", "-chat"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    name = _HUB_NAMES.get(key)
    return KNOWN_SHAPES[name] if name else None
