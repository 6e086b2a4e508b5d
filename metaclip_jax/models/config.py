"""Model configuration dataclasses (frozen, hashable, JSON-serialisable with ``to_dict``)."""

from __future__ import annotations

import dataclasses
from typing import Any

ACTIVATIONS = ("quick_gelu", "gelu")
POOLS = ("argmax", "eos")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    num_class_tokens: int = 1   # 1 = CLIP class token; K > 1 = Llip mixture tokens
    use_proj: bool = True       # visual.proj (CLIP); Llip drops it

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.grid * self.grid + self.num_class_tokens


@dataclasses.dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    pool: str = "argmax"  # "argmax" (CLIP BPE: EOT is the largest id) or "eos" (MetaCLIP 2: id == eos_id)
    eos_id: int = 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    activation: str = "gelu"    # "quick_gelu" for OpenAI / MetaCLIP 1 weights
    dtype: str = "float32"      # compute dtype for matmuls; params, LN, softmax and losses stay float32
    remat: str = "none"         # none | full | dots | dots_no_batch
    attention: str = "xla"      # xla | cudnn (jax.nn.dot_product_attention implementation)
    init_logit_scale: float = 2.6592600830288922  # ln(1 / 0.07)
    init_logit_bias: float | None = None          # SigLIP / Llip use -10; None = no bias parameter

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.text.pool not in POOLS:
            raise ValueError(f"text.pool must be one of {POOLS}, got {self.text.pool!r}")
        if self.vision.width % self.vision.heads or self.text.width % self.text.heads:
            raise ValueError("width must be divisible by heads")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError("image_size must be divisible by patch_size")

    def replace(self, **kw: Any) -> CLIPConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        d = dict(d)
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(vision=vision, text=text, **d)
