"""The README's main command: the whole system end to end on CPU, with no data and no network.

    python -m launch.demo --workdir runs/demo            # (make demo) ~10 minutes on 2 cores
    python -m launch.demo --workdir runs/demo_quick --quick   # reduced run (the test), ~2 minutes

Stages, each a real stage of the stack, each resumable (a rerun in the same workdir reuses what is done):

1. data      ``launch.demo_data``: a long-tailed synthetic pool of rendered coloured shapes with noisy
             captions (webdataset tars), its concept metadata, and held-out eval sets      -> data/
2. curation  ``curation.runner``: match -> count -> balance (t by the tail-proportion rule) -> pack
             (ArrayRecord) -> report (plots)                                               -> curation/
3. train     ``train.loop`` with ``configs/demo.py:clip`` and ``:llip``: checkpoints, metrics,
             training_curves.png                                                          -> clip/, llip/
4. evaluate  ``evaluate.registry``: zero-shot top-1 over the 30 colour x shape classes (held-out image
             folder) and image-text retrieval (held-out captions)                   -> {clip,llip}/eval.json
5. summary   ``summary.json`` + a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

from launch import demo_data

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
MODELS = ("clip", "llip")

FULL = dict(pool=24_000, zeroshot_per_class=20, retrieval=300)
QUICK = dict(pool=4_000, zeroshot_per_class=4, retrieval=100)
TAIL_PROPORTION = 0.06  # MetaCLIP's rule: t = the count below which the tail holds 6% of all matches


def log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- stages

def stage_data(workdir: str, quick: bool, seed: int) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    return demo_data.generate(os.path.join(workdir, "data"), seed=seed, **sizes)


def stage_curation(workdir: str, tail_proportion: float) -> dict[str, Any]:
    from curation import runner
    from curation.config import from_dict

    data = os.path.join(workdir, "data")
    cfg = from_dict({
        "inputs": [os.path.join(data, "pool", "*.tar")],
        "metadata": os.path.join(data, "metadata.json"),
        "workdir": os.path.join(workdir, "curation"),
        "workers": min(2, os.cpu_count() or 1),
        "max_error_rate": 0.05,
        "source": {"format": "webdataset", "url_field": "url", "text_fields": ["caption"]},
        "balance": {"t": None, "tail_proportion": tail_proportion, "mode": "per_image", "seed": 0},
    })
    runner.run(cfg)
    with open(os.path.join(cfg.out_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(cfg.workdir, "report", "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    return {"out_dir": cfg.out_dir, "manifest": manifest, "report": report}


def stage_train(workdir: str, model: str, quick: bool, paths: str, overrides: list[str]) -> dict[str, Any]:
    from metaclip_jax.config_schema import load_config
    from train import loop

    variant = f"{model}_quick" if quick else model
    run_dir = os.path.join(workdir, model)
    config = load_config(f"{CONFIG}:{variant}", [f"--config.data.paths={paths}", *overrides])
    with config.unlocked():
        config.workdir = run_dir
    summary = loop.train_and_evaluate(config, run_dir)
    curves = os.path.join(run_dir, "training_curves.png")
    if os.path.exists(curves):
        shutil.copyfile(curves, os.path.join(workdir, f"{model}_training_curves.png"))
    return summary


def stage_eval(workdir: str, model_name: str, data: dict[str, Any]) -> dict[str, Any]:
    """Zero-shot and retrieval of the newest checkpoint of ``workdir/model_name`` (skipped when its
    ``eval.json`` is for that step already)."""
    from evaluate import loading, registry
    from metaclip_jax.sharding import make_mesh
    from metaclip_jax.tokenizer import ClipTokenizer
    from train.checkpoint import Checkpointer

    run_dir = os.path.join(workdir, model_name)
    out = os.path.join(run_dir, "eval.json")
    ckpt = Checkpointer(run_dir, every_steps=0)
    step = ckpt.latest_step()
    ckpt.close()
    if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            done = json.load(f)
        if done.get("step") == step:
            log(f"eval {model_name}: reusing {out} (step {step})")
            return done
    mesh = make_mesh()
    model_type, model = loading.load_model(run_dir, mesh=mesh)
    ctx = int(model.cfg.text.context_length)
    tok = ClipTokenizer(context_length=ctx)
    ev_dir = os.path.join(workdir, "data", "eval")
    zs = registry.build_evaluator("shapes", {
        "type": "zeroshot", "dataset": "folder:" + os.path.join(ev_dir, "zeroshot"),
        "classnames": data["classes"], "templates": data["templates"], "batch_size": 200},
        mesh, tokenizer=tok)
    rt = registry.build_evaluator("captions", {
        "type": "retrieval", "dataset": "captions:" + os.path.join(ev_dir, "retrieval", "captions.jsonl"),
        "batch_size": 100}, mesh, tokenizer=tok)
    m: dict[str, float] = {}
    for ev in (zs, rt):
        t0 = time.time()
        m.update(ev.run(model, progress=True))
        log(f"eval {model_name}/{ev.name}: {time.time() - t0:.1f}s")
    res = {"step": step, "model_type": model_type,
           "zeroshot_top1": m["shapes/top1"] / 100, "zeroshot_top5": m["shapes/top5"] / 100,
           "retrieval_i2t_r1": m["captions/image_to_text_R@1"] / 100,
           "retrieval_t2i_r1": m["captions/text_to_image_R@1"] / 100,
           "retrieval_r1": m["captions/mean_R@1"] / 100,
           "retrieval_i2t_r5": m["captions/image_to_text_R@5"] / 100,
           "metrics": m}
    _write_json(out, res)
    return res


# ----------------------------------------------------------------------------------------------- summary

def _head_tail(counts: list[int]) -> float:
    c = sorted(counts)
    return c[-1] / max(c[0], 1)


def curated_class_counts(out_dir: str, classes: list[str]) -> dict[str, int]:
    """Records per colour x shape class in the curated shards (the class is in the demo pool's URLs)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    from metaclip_jax.records import decode

    with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
        shards = [os.path.join(out_dir, s["file"]) for s in json.load(f)["shards"]]
    counts = dict.fromkeys(classes, 0)
    ds = ArrayRecordDataSource(shards)
    for i in range(len(ds)):
        name = decode(ds[i]).url.rsplit("/", 2)[-2].replace("-", " ")
        if name in counts:
            counts[name] += 1
    return counts


def plot_class_balance(path: str, before: dict[str, int], after: dict[str, int]) -> None:
    """Bar chart of pairs per colour x shape class, pool vs curated, sorted by pool count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(before, key=lambda k: -before[k])
    fig, ax = plt.subplots(figsize=(11, 3.8))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [before[n] for n in names], 0.4, label="pool (matched or not)")
    ax.bar([i + 0.2 for i in x], [after[n] for n in names], 0.4, label="curated (balanced)")
    ax.set_xticks(list(x), names, rotation=75, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("image-caption pairs")
    ax.set_title("colour x shape classes: the long tail before and after MetaCLIP balancing")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def print_table(summary: dict[str, Any]) -> None:
    rows = [("model", "zero-shot top-1", "top-5", "retrieval mean R@1", "I->T R@1", "T->I R@1", "train s")]
    for name, m in summary["models"].items():
        rows.append((name, f"{m['zeroshot_top1']:.1%}", f"{m['zeroshot_top5']:.1%}",
                     f"{m['retrieval_r1']:.1%}", f"{m['retrieval_i2t_r1']:.1%}",
                     f"{m['retrieval_t2i_r1']:.1%}", f"{m['train_seconds']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    p, zs, cur = summary["pairs"], summary["zeroshot"], summary["curation"]
    print()
    print(f"pool {p['total']} pairs ({p['noise']} noise) -> matched {p['matched']} -> kept {p['kept']} "
          f"(t = {cur['t']:g}); largest/smallest class {cur['head_tail_before']:.1f}x -> "
          f"{cur['head_tail_after']:.1f}x")
    print(f"zero-shot: {zs['classes']} classes, chance {zs['chance']:.1%}; retrieval: "
          f"{zs['retrieval_images']} images, chance R@1 {zs['retrieval_chance_r1']:.1%}")
    print("\n".join([lines[0], "-" * len(lines[0]), *lines[1:]]))
    print(f"total {summary['seconds']:.0f}s  (" + ", ".join(f"{k} {v:.0f}s" for k, v in
                                                          summary["stage_seconds"].items()) + ")")


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="reduced sizes and steps (tests), ~2 minutes")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--tail-proportion", type=float, default=TAIL_PROPORTION)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of clip,llip")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="training config override for both models, e.g. --config total_steps=400")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU demo: do not probe for accelerators

    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain reads absl flags
        flags.FLAGS.mark_as_parsed()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s] %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    workdir = os.path.abspath(args.workdir)   # Orbax wants absolute checkpoint paths
    os.makedirs(workdir, exist_ok=True)
    t_start = time.time()
    secs: dict[str, float] = {}

    def timed(name: str, fn: Any, *a: Any) -> Any:
        t0 = time.time()
        log(f"---- {name}")
        out = fn(*a)
        secs[name] = round(time.time() - t0, 1)
        log(f"---- {name}: {secs[name]:.1f}s")
        return out

    data = timed("data", stage_data, workdir, args.quick, args.seed)
    cur = timed("curation", stage_curation, workdir, args.tail_proportion)
    overrides = [o if o.startswith("--config.") else f"--config.{o}" for o in args.config]
    models: dict[str, Any] = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            p.error(f"--models: unknown model {name!r}")
        tr = timed(f"train_{name}", stage_train, workdir, name, args.quick, cur["out_dir"], overrides)
        ev = timed(f"eval_{name}", stage_eval, workdir, name, data)
        models[name] = {**{k: v for k, v in ev.items() if k != "metrics"},
                        "train_seconds": tr["train_seconds"], "steps": tr["step"],
                        "examples_seen": tr["examples_seen"]}

    man, rep = cur["manifest"], cur["report"]
    kept_classes = curated_class_counts(cur["out_dir"], data["classes"])
    n_classes = len(data["classes"])
    plot_class_balance(os.path.join(workdir, "class_balance.png"), data["per_class"], kept_classes)
    summary = {
        "seconds": round(time.time() - t_start, 1),
        "stage_seconds": secs,
        "quick": args.quick,
        "pairs": {"total": data["pool_pairs"], "noise": data["noise_pairs"],
                  "matched": int(rep["totals"]["matched_texts"]),
                  "kept": int(man["counts"]["records"])},
        "curation": {"t": float(man["balance"]["t"]),
                     "tail_proportion": man["balance"].get("tail_proportion"),
                     "metadata_entries": data["metadata_entries"],
                     "class_counts_before": data["per_class"], "class_counts_after": kept_classes,
                     "head_tail_before": _head_tail(list(data["per_class"].values())),
                     "head_tail_after": _head_tail(list(kept_classes.values())),
                     "plots": sorted(os.path.relpath(os.path.join(workdir, "curation", "report", f), workdir)
                                     for f in os.listdir(os.path.join(workdir, "curation", "report"))
                                     if f.endswith(".png")) + ["class_balance.png"]},
        "zeroshot": {"classes": n_classes, "chance": 1 / n_classes, "images": data["zeroshot_images"],
                     "templates": data["templates"], "retrieval_images": data["retrieval_images"],
                     "retrieval_chance_r1": 1 / data["retrieval_images"]},
        "models": models,
        "training_curves": [f"{m}_training_curves.png" for m in models],
    }
    _write_json(os.path.join(workdir, "summary.json"), summary)
    print_table(summary)
    return summary


if __name__ == "__main__":
    main()
