"""Llip pair head: folded vs direct (reference) vs the CLIP / SigLIP heads, FLOPs, step time and memory.

Run: ``python -m benchmarks.llip_head [--quick]``. The measurement runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax is imported (8 simulated CPU
devices for the memory table). Head dimensions are those of Llip B/16 K = 32: D = 512, H = 8, d = 64.

1. FLOPs per step of the head (forward; analytic from ``llip_loss.head_flops`` and XLA's
   ``cost_analysis`` of the compiled forward, and of forward + backward), at the timing batch.
2. Step time: fwd + bwd of one device's loss head (b local images x n captions) on fixed random tower
   outputs (jit, single device, warm-up excluded, median of several interleaved runs, blocking on the
   results) for folded, direct and plain CLIP / SigLIP heads at equal batch.
3. Compiled per-device memory (``jit(...).lower(...).compile().memory_analysis()``) of the sharded loss
   + gradients for global batch 1k ... 32k on an 8-device mesh (compile only, nothing is run).

The last line is the headline: ``folded_speedup`` = direct step time / folded step time.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from typing import Any

D, H, K = 512, 8, 32
WORKER_ENV = "LLIP_HEAD_BENCH_WORKER"


def _machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | load {load:.2f}"


def _inputs(b: int, n: int, seed: int = 0) -> tuple[Any, ...]:
    """Fixed random tower outputs: b local images, n captions (the gathered global batch)."""
    import jax
    import jax.numpy as jnp

    from metaclip_jax.models.clip import l2_normalize

    d = D // H
    ks = jax.random.split(jax.random.key(seed), 6)
    kmat = 0.5 * jax.random.normal(ks[0], (b, H, K, d))
    vmat = jax.random.normal(ks[1], (b, H, K, d))
    q = jax.random.normal(ks[2], (n, H, d))
    zt = l2_normalize(jax.random.normal(ks[3], (n, D)))
    w_o = jax.random.normal(ks[4], (D, D)) * D**-0.5
    img = jax.random.normal(ks[5], (b, D))               # CLIP / SigLIP image tower output
    return (kmat, vmat, q, zt, w_o, jnp.asarray(2.659, jnp.float32), jnp.asarray(-10.0, jnp.float32), img)


def _flops(compiled: Any) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def _head_fns(chunk: int) -> dict[str, Any]:
    """One device's loss head: b local images x all n captions (what each device runs in shard_map)."""
    import jax
    import jax.numpy as jnp

    from metaclip_jax import llip_loss
    from metaclip_jax.models.clip import l2_normalize

    def llip(form: str, chunk: int) -> Any:
        def fn(kmat: Any, vmat: Any, q: Any, zt: Any, w_o: Any, s: Any, b: Any, img: Any) -> Any:
            b_loc = kmat.shape[0]
            t = zt
            if form == "folded":  # r of the b local captions; the rest arrives by all_gather (stand-in)
                t = jnp.concatenate([llip_loss.fold_texts(zt[:b_loc], w_o, H),
                                     zt[b_loc:].reshape(-1, H, D // H)])
            total = llip_loss.local_loss_sum(form, kmat, vmat, w_o, q, t, jnp.exp(s), b, 5.0, 0, chunk)
            return total / kmat.shape[0]
        return fn

    def logits(img: Any, zt: Any, s: Any) -> Any:
        return jnp.exp(s) * l2_normalize(img) @ l2_normalize(zt).T

    def clip(kmat: Any, vmat: Any, q: Any, zt: Any, w_o: Any, s: Any, b: Any, img: Any) -> Any:
        lg = logits(img, zt, s)
        pos = jnp.diagonal(lg)
        rows = jax.nn.logsumexp(lg, axis=1) - pos
        cols = jax.nn.logsumexp(lg, axis=0)[: lg.shape[0]] - pos
        return 0.5 * (rows.mean() + cols.mean())

    def siglip(kmat: Any, vmat: Any, q: Any, zt: Any, w_o: Any, s: Any, b: Any, img: Any) -> Any:
        lg = logits(img, zt, s) + b
        y = jnp.where(jnp.arange(lg.shape[0])[:, None] == jnp.arange(lg.shape[1])[None, :], 1.0, -1.0)
        return -jnp.sum(jax.nn.log_sigmoid(y * lg)) / lg.shape[0]

    return {"folded": llip("folded", chunk), "direct": llip("direct", chunk), "clip": clip, "siglip": siglip,
            "_folded_1block": llip("folded", 0), "_direct_1block": llip("direct", 0)}


def flops_and_time(b: int, n: int, chunk: int, runs: int) -> dict[str, dict[str, float]]:
    """FLOPs (analytic, XLA) and fwd+bwd step time of every head; the timed runs are interleaved
    (folded, direct, clip, siglip, folded, ...) so background load hits all heads alike."""
    import jax

    from metaclip_jax import llip_loss

    args = jax.device_put(_inputs(b, n), jax.devices()[0])
    fns = _head_fns(chunk)
    argnums = (0, 1, 2, 3, 4, 5, 6, 7)
    names = ("folded", "direct", "clip", "siglip")
    out: dict[str, dict[str, float]] = {}
    steps = {}
    for name in names:
        row: dict[str, float] = {}
        # cost_analysis counts a loop body once: count FLOPs on a single (b x n) block for the Llip heads
        one = fns[f"_{name}_1block"] if name in ("folded", "direct") else fns[name]
        row["xla_fwd"] = _flops(jax.jit(one).lower(*args).compile())
        row["xla_fwd_bwd"] = _flops(jax.jit(jax.value_and_grad(one, argnums)).lower(*args).compile())
        kind = name if name in ("folded", "direct") else "clip"
        row["analytic_fwd"] = float(llip_loss.head_flops(b, H, K, D, kind, num_texts=n)["flops"])
        steps[name] = jax.jit(jax.value_and_grad(fns[name], argnums))
        jax.block_until_ready(steps[name](*args))  # warm-up (compile), excluded
        out[name] = row
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(runs):
        for name in names:
            t = time.perf_counter()
            jax.block_until_ready(steps[name](*args))
            times[name].append(time.perf_counter() - t)
    for name in names:
        ts = sorted(times[name])
        out[name]["step_s"] = ts[len(ts) // 2]
        out[name]["min_s"] = ts[0]
    return out


def memory_table(batches: list[int], chunk: int, image_chunk: int, forms: list[str]
                 ) -> list[tuple[int, str, dict[str, float]]]:
    """Per-device compiled memory of ``value_and_grad(llip_sigmoid_loss)`` on an 8-device mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from metaclip_jax import llip_loss
    from metaclip_jax.sharding import make_mesh

    mesh = make_mesh(devices=jax.devices()[:8])
    sh = NamedSharding(mesh, PartitionSpec("data"))
    rep = NamedSharding(mesh, PartitionSpec())
    d = D // H
    rows = []
    for B in batches:
        sds = lambda shape, s=sh: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=s)
        args = (sds((B, H, K, d)), sds((B, H, K, d)), sds((B, H, d)), sds((B, D)), sds((D, D), rep),
                sds((), rep), sds((), rep))
        ic = min(image_chunk, B // 8)
        for form in forms:
            fn = lambda *a, form=form, ic=ic: llip_loss.llip_sigmoid_loss(
                *a, tau=5.0, form=form, chunk_size=chunk, image_chunk=ic, mesh=mesh, batch_axes=("data",))
            compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3, 4, 5, 6))).lower(*args).compile()
            ma = compiled.memory_analysis()
            get = lambda k, ma=ma: float(getattr(ma, k, 0) or 0) / 2**20
            rows.append((B, form, {"temp_mib": get("temp_size_in_bytes"),
                                   "args_mib": get("argument_size_in_bytes"),
                                   "out_mib": get("output_size_in_bytes")}))
    return rows


def memory_one_device(b: int, ns: list[int], chunk: int, forms: list[str]
                      ) -> list[tuple[int, str, dict[str, float]]]:
    """Compiled memory of one device's share (b local images x n gathered captions), fwd + bwd."""
    import jax
    import jax.numpy as jnp

    fns = _head_fns(chunk)
    rows = []
    for n in ns:
        d = D // H
        sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
        args = (sds((b, H, K, d)), sds((b, H, K, d)), sds((n, H, d)), sds((n, D)), sds((D, D)), sds(()),
                sds(()), sds((b, D)))
        for form in forms:
            ma = jax.jit(jax.value_and_grad(fns[form], argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
            ma = ma.memory_analysis()
            rows.append((n, form, {"temp_mib": float(ma.temp_size_in_bytes) / 2**20,
                                   "args_mib": float(ma.argument_size_in_bytes) / 2**20}))
    return rows


def worker(quick: bool) -> None:
    import jax

    print(_machine())
    print(f"jax {jax.__version__} | {jax.device_count()} {jax.devices()[0].platform} devices | "
          f"head dims D={D} H={H} K={K} d={D // H} (Llip B/16 K=32)")
    b, n, chunk, runs = (16, 2048, 256, 5) if quick else (64, 2048, 256, 7)
    res = flops_and_time(b, n, chunk, runs)
    print(f"\n## Loss head of one device: {b} local images x {n} captions (= global batch {n} on "
          f"{n // b} devices), single device, caption chunk {chunk}, fwd+bwd, median of {runs}")
    print(f"{'head':8s} {'analytic fwd GFLOP':>19s} {'XLA fwd GFLOP':>14s} {'XLA fwd+bwd GFLOP':>18s} "
          f"{'step ms':>10s} {'min ms':>8s} {'/ folded':>9s}")
    fmt = lambda v: f"{v / 1e9:.3f}" if v == v else "-"
    for name, r in res.items():
        print(f"{name:8s} {fmt(r['analytic_fwd']):>19s} {fmt(r['xla_fwd']):>14s} "
              f"{fmt(r['xla_fwd_bwd']):>18s} {1e3 * r['step_s']:10.1f} {1e3 * r['min_s']:8.1f} "
              f"{r['step_s'] / res['folded']['step_s']:8.2f}x")
    batches = [1024, 32768] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
    forms = ["folded"] if quick else ["folded", "direct"]
    mem_chunk, mem_ichunk = 256, 256
    print(f"\n## Compiled per-device memory of loss + gradients, 8-device mesh (compile only), "
          f"caption chunk {mem_chunk}, image chunk {mem_ichunk}")
    print(f"{'global B':>9s} {'b/device':>9s} {'form':>7s} {'temp MiB':>10s} {'args MiB':>9s} "
          f"{'temp KiB / B':>13s}")
    for B, form, m in memory_table(batches, mem_chunk, mem_ichunk, forms):
        print(f"{B:9d} {B // 8:9d} {form:>7s} {m['temp_mib']:10.1f} {m['args_mib']:9.1f} "
              f"{1024 * m['temp_mib'] / B:13.2f}")
    b_real = 256
    print(f"\n## One device of a real run: b = {b_real} local images (128 or 256 in the official runs) x "
          f"global batch n captions, loss + gradients, compiled memory (compile only), caption chunk "
          f"{mem_chunk}")
    print(f"{'global B':>9s} {'form':>7s} {'temp MiB':>10s} {'args MiB':>9s}")
    for n, form, m in memory_one_device(b_real, batches, mem_chunk, forms):
        print(f"{n:9d} {form:>7s} {m['temp_mib']:10.1f} {m['args_mib']:9.1f}")
    speedup = res["direct"]["step_s"] / res["folded"]["step_s"]
    print(f"\nfolded speedup from the fastest runs: "
          f"{res['direct']['min_s'] / res['folded']['min_s']:.2f} x; XLA fwd+bwd FLOP ratio "
          f"{res['direct']['xla_fwd_bwd'] / res['folded']['xla_fwd_bwd']:.2f} x")
    print(f"\nheadline: folded_speedup {speedup:.2f} x (target 2.0)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller batch and memory sweep (< 1 minute)")
    args = p.parse_args(argv)
    if os.environ.get(WORKER_ENV) == "1":
        worker(args.quick)
        return
    env = dict(os.environ)
    env.update({WORKER_ENV: "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                "JAX_PLATFORMS": env.get("JAX_PLATFORMS", "cpu"), "TF_CPP_MIN_LOG_LEVEL": "3"})
    cmd = [sys.executable, "-m", "benchmarks.llip_head"] + (["--quick"] if args.quick else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    sys.exit(subprocess.call(cmd, env=env, cwd=root))


if __name__ == "__main__":
    main()
