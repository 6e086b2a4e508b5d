"""Tiny Llip (test-tiny towers, K = 4 mixture tokens, H = 4 heads) on generated data, CPU, ~1 minute.

    python -m train --config configs/llip_tiny.py --config.workdir=runs/llip_tiny
    variants: configs/llip_tiny.py:direct (reference head form), configs/llip_tiny.py:norm (q/k/v LayerNorm)
"""

from metaclip_jax.config_schema import default_config


def get_config(arg: str | None = None):
    config = default_config()
    config.seed = 0
    config.total_steps = 40
    config.log_every_steps = 10

    config.model.type = "llip"
    config.model.preset = "test-tiny"           # embed 32, 2-layer towers, 32 px images
    config.model.dtype = "float32"
    config.model.init_logit_bias = -10.0
    config.model.num_tokens = 4
    config.model.num_heads = 4
    config.model.tau = 5.0
    config.model.use_norm = False
    config.model.head_form = "auto"             # H*K = 16 < D = 32: folded

    config.loss.name = "llip"
    config.loss.chunk_size = None

    config.optimizer.lr = 1e-3
    config.optimizer.b2 = 0.95
    config.optimizer.warmup_steps = 5
    config.optimizer.weight_decay = 0.2

    config.data.synthetic_examples = 512
    config.data.global_batch_size = 16
    config.data.image_size = 32
    config.data.tokenizer = "clip"
    config.data.worker_count = 0

    config.mesh.data = -1

    config.checkpoint.every_steps = 20
    config.checkpoint.keep = 2
    config.checkpoint.async_save = False
    config.eval.every_steps = 20

    if arg == "direct":
        config.model.head_form = "direct"
    elif arg == "norm":
        config.model.use_norm = True
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r}; known: direct, norm")
    return config
