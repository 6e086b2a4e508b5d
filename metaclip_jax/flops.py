"""Analytic FLOP counts for MFU (spec metaclip.md §6.13: model FLOPs / step time / peak).

XLA's ``cost_analysis`` counts the body of a ``lax.scan`` once, and our transformer layers are scanned, so
it undercounts a step by about the depth: the model FLOPs are computed from the architecture instead.
"""

from __future__ import annotations

from typing import Any

# Forward passes per training step: forward + backward (2x) + one recompute of the forward under full remat.
PASSES = {"none": 3.0, "full": 4.0, "dots": 3.0, "dots_no_batch": 3.0}


def forward_flops_per_example(cfg: Any) -> float:
    """Matmul FLOPs (2 per multiply-add) of one example through both towers, as open_clip's profile counts
    them (ViT-B/32: 14.78 GFLOPs = 8.82 image + 5.96 text). Attention is counted in full (S^2)."""

    def tower(s: int, w: int, m: int, layers: int) -> float:
        return layers * (2 * s * w * 3 * w + 4 * s * s * w + 2 * s * w * w + 4 * s * w * m)

    v, t = cfg.vision, cfg.text
    n_patch = v.grid * v.grid
    image = 2 * n_patch * 3 * v.patch_size**2 * v.width + tower(v.seq_len, v.width, v.mlp_dim, v.layers)
    if v.use_proj:
        image += 2 * v.width * cfg.embed_dim
    text = tower(t.context_length, t.width, t.mlp_dim, t.layers) + 2 * t.width * cfg.embed_dim
    return float(image + text)


def train_step_flops(cfg: Any, global_batch: int, remat: str = "none") -> float:
    """Model FLOPs of one training step over the global batch: towers (forward, backward, remat recompute)
    plus the B x B contrastive logits in both directions, forward and backward."""
    b = global_batch
    loss = 2 * 2 * b * b * cfg.embed_dim * 3
    return PASSES[remat] * forward_flops_per_example(cfg) * b + loss
