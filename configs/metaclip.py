"""MetaCLIP 1 training recipes (spec metaclip.md §6.10): the OpenAI-CLIP recipe at 12.8B seen pairs.

    python -m train --config configs/metaclip.py:b32_400m --config.data.paths=gs://BUCKET/400m/
    python -m launch.aot --config configs/metaclip.py:l14_400m --topology v5p:4x4x8

Every variant: global batch 32,768; AdamW b1 0.9, b2 0.98, eps 1e-6, weight decay 0.2 (open_clip exclusions);
2,000 warmup steps then cosine to 0; no gradient clipping; 32 epochs of 400M examples = 12,207 x 32 =
390,624 steps (both the 400M and the 2.5B "fullcc" sets use the 400M epoch, spec §6.8); QuickGELU presets;
bf16 compute with float32 params and optimizer state (TPU); remat for B/16 and larger; FSDP over every chip
(params, gradients and Adam moments sharded along the model width; the batch over the same axis).
"""

from metaclip_jax.config_schema import default_config

# variant: (preset, lr, remat, data set)
VARIANTS = {
    "b32_400m": ("ViT-B-32-quickgelu", 5e-4, "none", "400m"),
    "b16_400m": ("ViT-B-16-quickgelu", 5e-4, "full", "400m"),
    "l14_400m": ("ViT-L-14-quickgelu", 4e-4, "full", "400m"),
    "b32_fullcc": ("ViT-B-32-quickgelu", 5e-4, "none", "fullcc"),
    "b16_fullcc": ("ViT-B-16-quickgelu", 5e-4, "full", "fullcc"),
    "l14_fullcc": ("ViT-L-14-quickgelu", 4e-4, "full", "fullcc"),
    "h14_fullcc": ("ViT-H-14-quickgelu", 4e-4, "full", "fullcc"),
    "G14_fullcc": ("ViT-bigG-14-quickgelu", 4e-4, "full", "fullcc"),
}


def get_config(arg: str | None = None):
    arg = arg or "b32_400m"
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; known: {', '.join(VARIANTS)}")
    preset, lr, remat, _dataset = VARIANTS[arg]  # 400m vs fullcc differ only in data.paths
    config = default_config()
    config.seed = 0
    config.log_every_steps = 100

    config.total_epochs = 32
    config.data.num_examples = 400_000_000      # open_clip train_num_samples (the "epoch"), both data sets
    config.data.global_batch_size = 32_768
    config.data.paths = ()                      # --config.data.paths=... (curated ArrayRecord shards)
    config.data.online_balancing = True
    config.data.worker_count = 16
    config.data.read_threads = 4

    config.model.type = "clip"
    config.model.preset = preset
    config.model.dtype = "bfloat16"
    config.model.remat = remat

    config.loss.name = "clip"
    config.loss.chunk_size = 4096               # columns per chunk: logits per chip <= B_local x 4096

    config.optimizer.lr = lr
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-6
    config.optimizer.weight_decay = 0.2
    config.optimizer.warmup_steps = 2000
    config.optimizer.schedule = "cosine"
    config.optimizer.grad_clip = None
    config.optimizer.grad_accum_steps = 1

    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1

    config.checkpoint.every_steps = 5000
    config.checkpoint.keep = 3
    config.eval.every_steps = 5000
    config.eval.evaluators = ()
    return config
