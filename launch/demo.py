"""The README's main command (until the full demo lands): a tiny CLIP training smoke on generated data.

Generates coloured-shape images with matching captions, trains the ``test-tiny`` CLIP on CPU for a few
dozen steps with the symmetric InfoNCE loss, and reports the loss going down.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from metaclip_jax.models import presets
from metaclip_jax.models.clip import CLIP

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


def make_batch(rng: np.random.Generator, n: int, size: int, vocab: dict[str, int]):
    names = list(COLOURS)
    idx = rng.integers(0, len(names), n)
    images = np.zeros((n, size, size, 3), np.uint8)
    tokens = np.zeros((n, 77), np.int32)
    for i, c in enumerate(idx):
        images[i] = COLOURS[names[c]]
        images[i] = np.clip(images[i] + rng.integers(-20, 20, images[i].shape), 0, 255)
        tokens[i, :3] = [49406, vocab[names[c]], 49407]
    return jnp.asarray(images), jnp.asarray(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = presets.get_config("test-tiny")
    model = CLIP(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    vocab = {name: 1000 + i for i, name in enumerate(COLOURS)}

    @nnx.jit
    def step(model, opt, images, tokens):
        def loss_fn(m):
            img, txt, scale = m(images, tokens)
            logits = scale * img @ txt.T
            labels = jnp.arange(logits.shape[0])
            return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                          + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    start = time.time()
    losses = []
    for i in range(args.steps):
        images, tokens = make_batch(rng, 16, cfg.vision.image_size, vocab)
        losses.append(float(jax.block_until_ready(step(model, opt, images, tokens))))
        if i % 10 == 0 or i == args.steps - 1:
            rate = (i + 1) / (time.time() - start)
            print(f"step {i:4d}  loss {losses[-1]:.4f}  {rate:.1f} steps/s  "
                  f"eta {(args.steps - i - 1) / rate:.0f}s", flush=True)
    summary = {"seconds": time.time() - start, "first_loss": losses[0], "last_loss": losses[-1]}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
