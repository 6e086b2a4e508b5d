"""Train-step throughput and MFU, ours vs open_clip (same model, batch and precision, same run).

    python -m benchmarks.train_step                         # ViT-S-16 CLIP, batch 64, float32, CPU
    python -m benchmarks.train_step --quick                 # ViT-S-32, batch 32: under a minute
    python -m benchmarks.train_step --model ViT-B-16 --batch 256 --precision bf16 --attention cudnn  # GPU

Ours: the real jitted train step (``train.step.make_train_step``: forward, symmetric InfoNCE, AdamW,
logit-scale clamp), warm-up excluded, the median of ``--steps`` steps, blocking on each step. FLOPs per
step are the model's (``metaclip_jax.flops``, matching open_clip's profile); the peak is a large matmul
measured in the same run; MFU = achieved FLOP/s / peak. open_clip: the same architecture, AdamW with
the same hyper-parameters and ``ClipLoss``, timed the same way (CUDA torch with bf16 autocast on a GPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np


def _median_step_time(run_step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        run_step()
    times = []
    for i in range(steps):
        t = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - t)
        print(f"  step {i + 1}/{steps}: {times[-1] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    return statistics.median(times)


def measure_peak_flops(dtype: str) -> float:
    """FLOP/s of a large square matmul on the default JAX device (the device's practical peak)."""
    import jax
    import jax.numpy as jnp

    on_cpu = jax.devices()[0].platform == "cpu"
    n = 1024 if on_cpu else 8192
    dt = jnp.float32 if dtype == "fp32" else jnp.bfloat16
    a = jnp.ones((n, n), dt)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    reps = 5 if on_cpu else 50
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    jax.block_until_ready(out)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def bench_ours(model: str, batch: int, precision: str, attention: str, remat: str, mesh_spec: str,
               steps: int, warmup: int) -> dict[str, Any]:
    import jax

    from metaclip_jax.config_schema import default_config, resolve_durations, validate
    from train.state import create_train_state
    from train.step import batch_sharding, make_train_step

    data, fsdp, tensor = (int(x) for x in mesh_spec.split(","))
    config = default_config()
    config.model.preset = model
    config.model.dtype = "bfloat16" if precision == "bf16" else "float32"
    config.model.attention = attention
    config.model.remat = remat
    config.loss.name = "clip"
    config.data.global_batch_size = batch
    config.total_steps = 1000
    config.optimizer.warmup_steps = 10
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    validate(config, num_devices=jax.device_count())
    config = resolve_durations(config)

    from train.mesh import build_mesh

    mesh = build_mesh(config)
    state, shardings = create_train_state(config, mesh)
    step = make_train_step(config, mesh, shardings)
    from metaclip_jax.models import presets

    size = presets.get_config(model).vision.image_size
    rng = np.random.default_rng(0)
    bs = batch_sharding(config, mesh)
    images = jax.device_put(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), bs)
    tokens = np.zeros((batch, 77), np.int32)
    tokens[:, 0] = 49406
    tokens[:, 1:20] = rng.integers(1, 49000, (batch, 19))
    tokens[:, 20] = 49407
    batch_arrays = {"image": images, "text": jax.device_put(tokens, bs)}
    step.lower(state, batch_arrays).compile()  # compile outside the timed steps
    from metaclip_jax.flops import train_step_flops

    # Analytic model FLOPs: XLA's cost analysis counts a scanned layer once (metaclip_jax/flops.py).
    flops = train_step_flops(presets.get_config(model), batch, remat)

    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = step(holder["state"], batch_arrays)
        jax.block_until_ready(metrics["loss"])

    t = _median_step_time(run, steps, warmup)
    return {"step_s": t, "samples_per_s": batch / t, "flops_per_step": flops,
            "devices": jax.device_count(), "platform": jax.devices()[0].platform}


def bench_open_clip(model: str, batch: int, precision: str, steps: int, warmup: int) -> dict[str, Any] | None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    try:
        from tests.reference import import_open_clip

        open_clip, torch = import_open_clip()
    except BaseException as e:  # pytest.skip raises a BaseException subclass
        print(f"open_clip unavailable: {e}", file=sys.stderr)
        return None
    from open_clip.loss import ClipLoss

    from metaclip_jax import open_clip_interop as oc
    from metaclip_jax.models import presets

    cfg = presets.get_config(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    net = open_clip.CLIP(**oc.open_clip_model_config(cfg)).to(device).train()
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and not any(
        s in n for s in ("bn", "ln", "bias", "logit_scale", "norm"))]
    no_decay = [p for n, p in net.named_parameters() if not any(p is q for q in decay)]
    groups = [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    size = cfg.vision.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    tokens = torch.zeros(batch, 77, dtype=torch.long, device=device)
    tokens[:, 0] = 49406
    tokens[:, 1:20] = torch.randint(1, 49000, (batch, 19), device=device)
    tokens[:, 20] = 49407
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            img, txt, scale = net(images, tokens)
            loss = loss_fn(img, txt, scale)
        loss.backward()
        opt.step()
        with torch.no_grad():
            net.logit_scale.clamp_(0, np.log(100))
        if device == "cuda":
            torch.cuda.synchronize()
        else:
            float(loss.detach())

    t = _median_step_time(run, steps, warmup)
    return {"step_s": t, "samples_per_s": batch / t, "torch": torch.__version__, "device": device}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-S-16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
    p.add_argument("--remat", default="none")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hosts", type=int, default=1, help="hosts feeding the step (input headroom report)")
    p.add_argument("--pipeline-images-per-s", type=float, default=None,
                   help="measured per-host input pipeline rate (benchmarks/input_pipeline.py)")
    p.add_argument("--skip-open-clip", action="store_true")
    p.add_argument("--quick", action="store_true", help="ViT-S-32, batch 32, 3 steps: under a minute")
    args = p.parse_args()
    if args.quick:
        args.model, args.batch, args.steps, args.warmup = "ViT-S-32", 32, 3, 1

    import jax

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}")
    print(f"model {args.model}, global batch {args.batch}, {args.precision}, attention {args.attention}, "
          f"remat {args.remat}, mesh {args.mesh}")
    peak = measure_peak_flops(args.precision)
    ours = bench_ours(args.model, args.batch, args.precision, args.attention, args.remat, args.mesh,
                      args.steps, args.warmup)
    theirs = None if args.skip_open_clip else bench_open_clip(args.model, args.batch, args.precision,
                                                               args.steps, args.warmup)
    achieved = ours["flops_per_step"] / ours["step_s"]
    per_device = achieved / ours["devices"]
    mfu = per_device / peak
    print()
    print("| impl | step (ms) | samples/s | samples/s/device | TFLOP/s/device | MFU |")
    print("|---|---|---|---|---|---|")
    print(f"| metaclip-jax | {ours['step_s'] * 1e3:.1f} | {ours['samples_per_s']:.1f} | "
          f"{ours['samples_per_s'] / ours['devices']:.1f} | {per_device / 1e12:.3f} | {mfu:.1%} |")
    ratio = float("nan")
    if theirs:
        ratio = ours["samples_per_s"] / theirs["samples_per_s"]
        print(f"| open_clip {theirs['torch']} ({theirs['device']}) | {theirs['step_s'] * 1e3:.1f} | "
              f"{theirs['samples_per_s']:.1f} | {theirs['samples_per_s']:.1f} | - | - |")
    print(f"\nmatmul peak {peak / 1e12:.3f} TFLOP/s/device ({args.precision}); "
          f"model FLOPs per step {ours['flops_per_step'] / 1e9:.1f} GFLOP")
    need = ours["samples_per_s"] / args.hosts
    line = f"input headroom: each of {args.hosts} host(s) must deliver {need:.0f} images/s to feed the step"
    if args.pipeline_images_per_s:
        have = args.pipeline_images_per_s
        line += f"; the pipeline measured {have:.0f} ({have / need:.1f}x)"
    print(line)
    print(f"ratio vs open_clip (samples/s): {ratio:.2f}x")
    print(f"headline: ratio_vs_open_clip {ratio:.2f} x (target 1.0)")


if __name__ == "__main__":
    main()
