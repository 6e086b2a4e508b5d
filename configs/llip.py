"""Llip training recipes (spec llip.md §7): MetaCLIP data, 12.8B samples seen, sigmoid loss on
caption-conditioned image embeddings.

    python -m train --config configs/llip.py:b16_k32 --config.data.paths=gs://BUCKET/fullcc/
    variants: b32_k64 (ablation base), b16_k32 (released B/16), l14_k32 (tau 1), h14_k64 (use_norm),
              G14_k64 (released bigG, use_norm)

Every variant: global batch 32,768; AdamW b1 0.9, **b2 0.95**, eps 1e-6, weight decay 0.2 (open_clip
exclusions: the [K, W] mixture tokens and the k/v/q/out projections are decayed); 2,000 warmup steps then
cosine to 0; no gradient clipping; 32 epochs of 400M = 12.8B samples (390,624 steps); QuickGELU presets
(``-quickgelu``); H = 8 cross-attention heads; logit_scale init ln(1/0.07) clamped to [0, ln 100],
logit_bias -10. The pair head picks the exact folded form when H·K < D (B/16, L/14, H/14, G/14) and the
direct form otherwise (B/32 K = 64); ``--config.model.head_form`` overrides.
"""

from metaclip_jax.config_schema import default_config

# variant: (preset, K, tau, use_norm, lr, remat)
VARIANTS = {
    "b32_k64": ("ViT-B-32-quickgelu", 64, 5.0, False, 5e-4, "none"),
    "b16_k32": ("ViT-B-16-quickgelu", 32, 5.0, False, 5e-4, "full"),
    "l14_k32": ("ViT-L-14-quickgelu", 32, 1.0, False, 4e-4, "full"),
    "h14_k64": ("ViT-H-14-quickgelu", 64, 5.0, True, 4e-4, "full"),
    "G14_k64": ("ViT-bigG-14-quickgelu", 64, 5.0, True, 4e-4, "full"),
}


def get_config(arg: str | None = None):
    arg = arg or "b16_k32"
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; known: {', '.join(VARIANTS)}")
    preset, k, tau, use_norm, lr, remat = VARIANTS[arg]
    config = default_config()
    config.seed = 0
    config.log_every_steps = 100

    config.total_epochs = 32                    # x 400M = 12.8B samples seen
    config.data.num_examples = 400_000_000
    config.data.global_batch_size = 32_768
    config.data.paths = ()                      # --config.data.paths=... (curated ArrayRecord shards)
    config.data.online_balancing = True
    config.data.scale = (0.9, 1.0)
    config.data.worker_count = 16
    config.data.read_threads = 4

    config.model.type = "llip"
    config.model.preset = preset
    config.model.dtype = "bfloat16"
    config.model.remat = remat
    config.model.init_logit_scale = None        # ln(1/0.07), as the official code (not SigLIP's ln 10)
    config.model.init_logit_bias = -10.0
    # --- Llip fields (registered by metaclip_jax.models.llip) ---
    config.model.num_tokens = k
    config.model.num_heads = 8
    config.model.tau = tau
    config.model.use_norm = use_norm
    config.model.head_form = "auto"

    config.loss.name = "llip"
    config.loss.chunk_size = None               # captions per scored block: None = the per-device batch

    config.optimizer.lr = lr
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.eps = 1e-6
    config.optimizer.weight_decay = 0.2
    config.optimizer.warmup_steps = 2000
    config.optimizer.schedule = "cosine"
    config.optimizer.grad_clip = None
    config.optimizer.grad_accum_steps = 1
    config.optimizer.max_logit_scale = 100.0

    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1

    config.checkpoint.every_steps = 5000
    config.checkpoint.keep = 3
    config.eval.every_steps = 5000
    config.eval.evaluators = ()
    return config
