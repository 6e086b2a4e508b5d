"""Standalone evaluation: ``python -m evaluate --checkpoint DIR|FILE --tasks imagenet,cifar10,coco ...``.

Examples::

    # MetaCLIP B/32 400M weights (open_clip file), ImageNet from a TFDS array_record build
    python -m evaluate --checkpoint b32_400m.pt --model ViT-B-32-quickgelu \\
        --tasks imagenet --data-dir ~/tensorflow_datasets --output runs/eval_b32

    # the 26-task suite with MetaCLIP's own prompt files, plus COCO (Karpathy test split)
    python -m evaluate --checkpoint b32_400m.pt --quickgelu --tasks metaclip26,coco \\
        --data-dir /data/eval --templates templates.json --classnames labels.json \\
        --source coco=karpathy:/data/coco/dataset_coco.json,/data/coco,test

Writes ``OUTPUT/results.json`` (per-task metrics in percent, headline scores, the suite average) and
``OUTPUT/results.md`` (a markdown table). Task data: ``--source NAME=SPEC`` (``tasks.DataSpec``) or the
``--data-dir`` conventions of ``tasks.resolve_data``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from evaluate import tasks


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="open_clip/MetaCLIP file (.pt/.bin/.safetensors), checkpoint folder, "
                        "or random:PRESET")
    p.add_argument("--tasks", required=True,
                   help="comma-separated task names or suites (metaclip26, retrieval)")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir and/or folder with one entry per task")
    p.add_argument("--source", action="append", default=[], metavar="NAME=SPEC",
                   help="data of one task, e.g. imagenet=tfds:imagenet2012,validation (repeatable)")
    p.add_argument("--output", default=None, help="output folder (default: print only)")
    p.add_argument("--model", default=None, help="model preset for open_clip files, e.g. ViT-B-32-quickgelu")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quickgelu", dest="quickgelu", action="store_true", default=None)
    g.add_argument("--no-quickgelu", dest="quickgelu", action="store_false")
    p.add_argument("--classnames", default=None, help="JSON {dataset: [class names]} (overrides)")
    p.add_argument("--templates", default=None, help="JSON {dataset: [templates]} (overrides)")
    p.add_argument("--batch-size", type=int, default=256, help="global image batch")
    p.add_argument("--text-batch-size", type=int, default=None, help="global text batch")
    p.add_argument("--temperatures", default=None, help="Llip attention temperatures, e.g. 1,3,5,8,10")
    p.add_argument("--class-chunk", type=int, default=None, help="score classes in chunks (Llip)")
    p.add_argument("--image-chunk", type=int, default=1024, help="retrieval block rows")
    p.add_argument("--text-chunk", type=int, default=4096, help="retrieval block columns")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--workers", type=int, default=0, help="Grain worker processes for decoding")
    p.add_argument("--devices", type=int, default=None, help="use only the first N devices")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p.parse_args(argv)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _fmt(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}"


def markdown_table(results: dict[str, Any]) -> str:
    """Per-task headline metrics as a markdown table (plus the zero-shot average)."""
    lines = [f"# Evaluation of `{results['checkpoint']}`", "",
             "| task | type | metric | score | top-1 | top-5 | examples |", "|---|---|---|---|---|---|---|"]
    for name, r in results["tasks"].items():
        m = r["metrics"]
        if r["type"] == "zeroshot":
            lines.append(f"| {name} | zero-shot | {r['main_metric']} | {_fmt(m[f'{name}/score'])} | "
                         f"{_fmt(m[f'{name}/top1'])} | {_fmt(m[f'{name}/top5'])} | "
                         f"{int(m[f'{name}/num_examples'])} |")
        else:
            lines.append(f"| {name} | retrieval | mean R@1 | {_fmt(m[f'{name}/mean_R@1'])} | "
                         f"I→T {_fmt(m[f'{name}/image_to_text_R@1'])} | "
                         f"T→I {_fmt(m[f'{name}/text_to_image_R@1'])} | {int(m[f'{name}/num_images'])} |")
    if results.get("zeroshot_average") is not None:
        lines += ["", f"Zero-shot average over {results['zeroshot_count']} tasks: "
                      f"**{_fmt(results['zeroshot_average'])}**"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain reads absl flags
        flags.FLAGS.mark_as_parsed()
    import jax

    from evaluate import loading, registry
    from metaclip_jax.sharding import make_mesh

    devices = jax.devices()[: args.devices] if args.devices else None
    mesh = make_mesh(devices=devices)
    sources = {}
    for s in args.source:
        name, sep, spec = s.partition("=")
        if not sep:
            raise SystemExit(f"--source {s!r}: expected NAME=SPEC")
        sources[name.strip()] = spec
    names = tasks.expand_tasks(args.tasks)
    if not names:
        raise SystemExit("--tasks is empty")

    t0 = time.time()
    model_type, model = loading.load_model(args.checkpoint, args.model, args.quickgelu, mesh)
    logging.info("loaded %s model from %s in %.1fs", model_type, args.checkpoint, time.time() - t0)
    temps = [float(x) for x in args.temperatures.split(",")] if args.temperatures else None
    results: dict[str, Any] = {
        "checkpoint": args.checkpoint, "model_type": model_type, **loading.describe(model),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": list(argv) if argv is not None else sys.argv[1:], "tasks": {},
    }
    for name in names:
        task = tasks.get_task(name)
        spec = (tasks.DataSpec.parse(sources[name], args.data_dir) if name in sources
                else tasks.resolve_data(task, args.data_dir))
        typ = tasks.task_type(task, spec)
        entry: dict[str, Any] = {"type": typ, "dataset": spec, "batch_size": args.batch_size,
                                 "text_batch_size": args.text_batch_size, "max_examples": args.max_examples,
                                 "worker_count": args.workers, "temperatures": temps}
        if typ == "zeroshot":
            entry.update(classnames_file=args.classnames, templates_file=args.templates,
                         class_chunk=args.class_chunk)
        else:
            entry.update(image_chunk=args.image_chunk, text_chunk=args.text_chunk)
        t1 = time.time()
        ev = registry.build_evaluator(name, entry, mesh)
        m = ev.run(model, progress=not args.no_progress)
        info: dict[str, Any] = {"type": typ, "data": dataclasses.asdict(spec), "metrics": m,
                                "seconds": round(time.time() - t1, 2)}
        if typ == "zeroshot":
            info.update(main_metric=task.main_metric, num_classes=ev.num_classes,
                        num_templates=len(ev.templates), prompts=ev.prompt_origin,
                        metaclip_templates=tasks.METACLIP_TEMPLATE_COUNTS.get(task.metaclip or ""))
            logging.info("%s: %s = %.2f (top-1 %.2f)", name, task.main_metric, m[f"{name}/score"],
                         m[f"{name}/top1"])
        else:
            logging.info("%s: I->T R@1 %.2f, T->I R@1 %.2f", name, m[f"{name}/image_to_text_R@1"],
                         m[f"{name}/text_to_image_R@1"])
        results["tasks"][name] = info
    scores = [r["metrics"][f"{n}/score"] for n, r in results["tasks"].items() if r["type"] == "zeroshot"]
    results["zeroshot_average"] = sum(scores) / len(scores) if scores else None
    results["zeroshot_count"] = len(scores)
    suite = set(tasks.SUITES["metaclip26"])
    if suite <= set(results["tasks"]):
        results["metaclip26_average"] = sum(results["tasks"][n]["metrics"][f"{n}/score"] for n in suite) / 26

    table = markdown_table(results)
    print(table)
    if args.output and jax.process_index() == 0:
        os.makedirs(args.output, exist_ok=True)
        _atomic_write(os.path.join(args.output, "results.json"),
                      json.dumps(_json_safe(results), indent=2, sort_keys=False, default=str) + "\n")
        _atomic_write(os.path.join(args.output, "results.md"), table)
    return results


if __name__ == "__main__":
    main()
