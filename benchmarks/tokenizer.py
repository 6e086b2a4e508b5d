"""Tokenizer throughput: metaclip_jax.tokenizer vs open_clip 3.3.0 SimpleTokenizer, captions per second.

Run: ``python -m benchmarks.tokenizer [--quick]``. Uses the real COCO + Flickr8k captions in
``../shared/data/captions`` when present, otherwise generated English-like captions. A second,
generated multilingual / noisy set exercises the non-ASCII (Python) path. The last line is the
headline: batched speedup on the main set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from metaclip_jax.tokenizer import ClipTokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "captions"
BATCH = 1024


def machine_info() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for pkg in ("instant-clip-tokenizer", "open_clip_torch", "ftfy", "regex", "numpy"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{pkg} -")
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (
        f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | load {load[0]:.2f}\n"
        f"python {platform.python_version()} | " + ", ".join(versions)
    )


def real_captions() -> list[str] | None:
    if not DATA.is_dir():
        return None
    texts: list[str] = []
    for path in sorted(DATA.glob("*.json")):
        texts += [a["caption"] for a in json.loads(path.read_text(encoding="utf-8"))["annotations"]]
    for path in sorted(DATA.glob("*.txt")):
        texts += [ln.split("\t", 1)[1] for ln in path.read_text(encoding="utf-8").splitlines() if "\t" in ln]
    return texts or None


_WORDS = [
    "a", "an", "the", "man", "woman", "dog", "cat", "two", "people", "sitting", "standing", "on", "in",
    "with", "of", "at", "near", "red", "blue", "green", "large", "small", "white", "black", "kitchen",
    "street", "table", "bus", "train", "plate", "pizza", "bike", "riding", "holding", "next", "to", "field",
    "water", "beach", "snow", "tree", "building", "phone", "computer", "giraffe", "elephant", "horse", "sign",
]  # fmt: skip


def generated_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", " .", "", "!"]))
    return out


_NOISY = [
    "Ünïcödé façade", "naïve café", "Straße", "猫がソファの上で寝ています", "한국어 캡션", "一只狗在草地上",
    "😀🐶", "👍🏽", "Tom &amp; Jerry", "donâ€™t", "cafÃ©", "ﬁne", "ＦＵＬＬ", "“quoted”", "—", "€5",
    "Москва", "Αθήνα", "मुंबई", "القاهرة",
]  # fmt: skip


def noisy_captions(n: int, seed: int = 1) -> list[str]:
    """Alt-text-like captions with at least one non-ASCII or HTML-escaped piece (the slow path)."""
    rng = random.Random(seed)
    base = generated_captions(n, seed)
    return [f"{b} {rng.choice(_NOISY)} {rng.choice(_WORDS)}" for b in base]


def _progress(label: str, done: int, total: int, t0: float, last: int) -> None:
    """Progress on stderr: an updating line on a terminal, else a line per quarter of the pass."""
    rate = done / max(time.perf_counter() - t0, 1e-9)
    msg = f"  {label}: {done:>7}/{total} captions ({rate:,.0f}/s)"
    if sys.stderr.isatty():
        print("\r" + msg, end="" if done < total else "\n", file=sys.stderr, flush=True)
    elif done * 4 // total != last * 4 // total:
        print(msg, file=sys.stderr, flush=True)


def throughput(
    label: str, fn: Callable[[Sequence[str]], object], texts: list[str], batch: int, repeats: int
) -> float:
    """Best-of-``repeats`` captions/s for ``fn`` applied to ``texts`` in chunks of ``batch``."""
    fn(texts[: min(len(texts), 2 * batch)])  # warm-up: lazy init and word caches
    best, total = float("inf"), len(texts)
    every = max(total // (20 * batch), 1)  # about twenty progress checks per pass
    for r in range(repeats):
        t0, last = time.perf_counter(), 0
        for k, i in enumerate(range(0, total, batch)):
            if batch > 1:
                fn(texts[i : i + batch])
            else:
                fn(texts[i])
            done = min(i + batch, total)
            if k % every == every - 1 or done == total:
                _progress(f"{label} [{r + 1}/{repeats}]", done, total, t0, last)
                last = done
        best = min(best, time.perf_counter() - t0)
    return total / best


def load_open_clip():
    """open_clip's ViT-B-32 tokenizer (needs torch; registers torchvision op schemas like tests do)."""
    import torch

    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        load_open_clip.keepalive = lib
    except RuntimeError:
        pass
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="subsets and one repeat (under a minute)")
    args = ap.parse_args(argv)
    print(machine_info())

    real = real_captions()
    if real is not None:
        main_name, main_set = "real COCO+Flickr8k", real
    else:
        main_name, main_set = "generated English (no ../shared/data)", generated_captions(65_000)
    n_all, n_single = len(main_set), 5_000
    if args.quick:
        main_set, n_single = main_set[:15_000], 2_000
    main_name += f" ({len(main_set):,} of {n_all:,})" if len(main_set) < n_all else f" ({n_all:,})"
    noisy = noisy_captions(5_000 if args.quick else 20_000)
    repeats_ours, repeats_ref = (2, 1) if args.quick else (3, 2)

    ours = ClipTokenizer()
    try:
        ref = load_open_clip()
    except Exception as e:  # pragma: no cover - depends on the machine
        print(f"open_clip unavailable ({e}); cannot compute the ratio")
        print("headline: speedup_vs_open_clip nan x (target 1.0)")
        return

    rows = []
    for name, texts in [(main_name, main_set), (f"generated non-ASCII/HTML ({len(noisy):,})", noisy)]:
        for mode, batch in [(f"batch {BATCH}", BATCH), ("one text per call", 1)]:
            sub = texts if batch > 1 else texts[:n_single]
            a = throughput("ours", ours, sub, batch, repeats_ours)
            b = throughput("open_clip", ref, sub, batch, repeats_ref)
            rows.append((name, mode, a, b))

    print(f"\n{'caption set':<48} {'mode':<18} {'ours cap/s':>12} {'open_clip cap/s':>16} {'ratio':>7}")
    for name, mode, a, b in rows:
        print(f"{name:<48} {mode:<18} {a:>12,.0f} {b:>16,.0f} {a / b:>6.1f}x")
    headline = rows[0][2] / rows[0][3]
    print(f"headline: speedup_vs_open_clip {headline:.1f} x (target 1.0)")


if __name__ == "__main__":
    main()
