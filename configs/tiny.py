"""test-tiny CLIP on generated data, CPU: a complete run in well under 2 minutes.

    python -m train --config configs/tiny.py --config.workdir=runs/tiny
    variants: configs/tiny.py:siglip (sigmoid loss), configs/tiny.py:accum (2 micro-batches)
"""

from metaclip_jax.config_schema import default_config


def get_config(arg: str | None = None):
    config = default_config()
    config.seed = 0
    config.total_steps = 40
    config.log_every_steps = 10

    config.model.type = "clip"
    config.model.preset = "test-tiny"
    config.model.dtype = "float32"

    config.loss.name = "clip"

    config.optimizer.lr = 1e-3
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

    if arg == "siglip":
        config.loss.name = "siglip"
        config.model.init_logit_scale = 2.302585092994046  # ln 10
        config.model.init_logit_bias = -10.0
    elif arg == "accum":
        config.optimizer.grad_accum_steps = 2
    elif arg is not None:
        raise ValueError(f"unknown variant {arg!r}; known: siglip, accum")
    return config
