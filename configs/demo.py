"""The README demo (``make demo`` = ``python -m launch.demo``): tiny CLIP / Llip on curated synthetic shapes.

    python -m train --config configs/demo.py:clip --workdir runs/demo/clip \
        --config.data.paths=runs/demo/curation/out
    variants: clip (default), llip; add ``quick`` for the reduced test run: clip_quick, llip_quick

``launch/demo.py`` sets ``data.paths`` to the curated ArrayRecord shards. ``demo-tiny``: 32 px images,
8 px patches, 16-token captions, 2-layer towers; sized to train on 2 CPU cores in about two minutes.
"""

from metaclip_jax.config_schema import default_config


def get_config(arg: str | None = None):
    variant = arg or "clip"
    model, _, quick = variant.partition("_")
    if model not in ("clip", "llip") or quick not in ("", "quick"):
        raise ValueError(f"unknown variant {arg!r}; known: clip, llip, clip_quick, llip_quick")

    config = default_config()
    config.seed = 0
    config.total_steps = 1000
    config.log_every_steps = 50

    config.model.type = model
    config.model.preset = "demo-tiny"
    config.model.dtype = "float32"

    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.weight_decay = 0.1

    config.data.paths = ()                 # set by launch/demo.py: the curated shards
    config.data.global_batch_size = 128
    config.data.image_size = 32
    config.data.context_length = 16
    config.data.scale = (0.8, 1.0)
    config.data.online_balancing = False   # balanced offline (curation keep_prob = 1)
    config.data.worker_count = 0           # 2 cores: the step and the loader share them
    config.data.read_threads = 1

    config.mesh.data = -1

    config.checkpoint.every_steps = 200
    config.checkpoint.keep = 2
    config.checkpoint.async_save = True
    config.eval.every_steps = 100_000      # evaluation runs after training (launch/demo.py)

    if model == "clip":
        config.loss.name = "clip"
    else:
        config.loss.name = "llip"
        config.model.init_logit_bias = -10.0
        config.model.num_tokens = 4
        config.model.num_heads = 4
        config.model.tau = 5.0
        config.model.use_norm = True           # q/k/v LayerNorm: 57.7% vs 52.7% zero-shot at 800 steps
        config.model.head_form = "auto"
        config.optimizer.b2 = 0.95
        config.total_steps = 2400              # the sigmoid Llip head learns slower than CLIP here
        #                                        (1,200 steps: 72.2% zero-shot; 2,400: 79.8%)

    if quick:
        config.total_steps = 60
        config.log_every_steps = 20
        config.optimizer.warmup_steps = 10
        config.data.global_batch_size = 64
        config.checkpoint.every_steps = 30
    return config
