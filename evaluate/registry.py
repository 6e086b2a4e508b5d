"""Evaluator registry: ``config.eval`` entries -> evaluator objects.

Training-loop contract::

    from evaluate import registry
    evaluators = registry.build_evaluators(config, mesh)           # once, before the loop
    ...
    metrics = registry.run_evaluators(evaluators, model, step, last_step=step == total_steps)
    # or per evaluator:  if ev.should_run(step): metrics.update(ev.run(model))

``model`` is the ``nnx.Module`` being trained (its parameters already sharded on ``mesh``), a
``(graphdef, params_state)`` pair, or a params state when ``build_evaluators(..., graphdef=...)`` was
given. ``run`` returns ``{"<entry name>/<metric>": float}`` in percent (ranks and ``num_*`` counts as
they are); the loop adds its own prefix (e.g. ``eval/``) and excludes the time from throughput. Every
process must call ``run`` (multi-host: each process feeds its slice of each global batch, all run the
same number of batches with padding masked, and all get the same metrics back).

``config.eval`` is a mapping ``name -> entry`` (or a list of entries with a ``name`` key); an entry::

    imagenet=dict(type="zeroshot", task="imagenet", dataset="tfds:imagenet2012,validation",
                  data_dir="/data/tfds", every_steps=5000, batch_size=1024)
    coco=dict(type="retrieval", dataset="karpathy:/data/coco/dataset_coco.json,/data/coco,test",
              every_steps=5000)

Keys: ``type`` (zeroshot | retrieval; default: retrieval for caption data, else zero-shot), ``task``
(default: the name; selects prompts and the headline metric), ``dataset`` (a ``tasks.DataSpec`` string
or dict; default: found under ``data_dir`` by ``tasks.resolve_data``), ``data_dir``, ``every_steps``,
``batch_size``,
``text_batch_size``, ``max_examples``, ``worker_count``, and per type: zeroshot ``classnames_file``,
``templates_file``, ``classnames``, ``templates``, ``temperatures``, ``class_chunk``; retrieval ``ks``,
``image_chunk``, ``text_chunk``, ``temperatures``. An unknown key is an error naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from jax.sharding import Mesh

from evaluate import tasks
from evaluate.common import Evaluator
from evaluate.retrieval import RetrievalEvaluator
from evaluate.zeroshot import ZeroShotEvaluator

COMMON_KEYS = {"type", "task", "dataset", "data_dir", "every_steps", "batch_size", "text_batch_size",
               "max_examples", "worker_count", "temperatures"}
TYPE_KEYS = {
    "zeroshot": {"classnames_file", "templates_file", "classnames", "templates", "class_chunk"},
    "retrieval": {"ks", "image_chunk", "text_chunk"},
}


def _plain(x: Any) -> Any:
    return x.to_dict() if hasattr(x, "to_dict") else x


def eval_entries(config: Any) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, entry)]`` from a config holding ``eval`` (or the eval mapping / list itself)."""
    cfg = _plain(config)
    if isinstance(cfg, Mapping) and "eval" in cfg:
        cfg = _plain(cfg["eval"])
    elif hasattr(config, "eval"):
        cfg = _plain(config.eval)
    if cfg is None:
        return []
    if isinstance(cfg, Mapping):
        return [(str(k), dict(_plain(v))) for k, v in cfg.items()]
    out = []
    for e in cfg:
        e = dict(_plain(e))
        out.append((str(e.pop("name")), e))
    return out


def build_evaluator(name: str, entry: Mapping[str, Any], mesh: Mesh | None = None, *,
                    tokenizer: Any = None, graphdef: Any = None,
                    defaults: Mapping[str, Any] | None = None) -> Evaluator:
    """One evaluator from a config entry (``defaults`` fill keys the entry does not set)."""
    e = {**(defaults or {}), **entry}
    task = tasks.get_task(str(e.pop("task", name)))
    typ = e.pop("type", None)
    if typ is not None and typ not in TYPE_KEYS:
        raise ValueError(f"eval.{name}.type: {typ!r} is not one of {sorted(TYPE_KEYS)}")
    allowed = COMMON_KEYS | (TYPE_KEYS[typ] if typ else set().union(*TYPE_KEYS.values()))
    unknown = set(e) - allowed
    if unknown:
        raise ValueError(f"eval.{name}: unknown key(s) {sorted(unknown)}")
    data_dir = e.pop("data_dir", None)
    dataset = e.pop("dataset", None)
    if dataset is None:
        hint = task if typ in (None, task.type) else dataclasses.replace(task, type=typ)
        dataset = tasks.resolve_data(hint, data_dir)
    else:
        dataset = tasks.DataSpec.parse(dataset, data_dir)
    typ = typ or tasks.task_type(task, dataset)
    unknown = set(e) - COMMON_KEYS - TYPE_KEYS[typ]
    if unknown:
        raise ValueError(f"eval.{name}: key(s) {sorted(unknown)} do not apply to type {typ!r}")
    for key in ("temperatures", "ks"):
        if isinstance(e.get(key), str):
            e[key] = [float(x) if key == "temperatures" else int(x) for x in e[key].split(",")]
    cls = ZeroShotEvaluator if typ == "zeroshot" else RetrievalEvaluator
    return cls(name, data=dataset, task=task, mesh=mesh, tokenizer=tokenizer, graphdef=graphdef, **e)


def build_evaluators(config: Any, mesh: Mesh | None = None, *, tokenizer: Any = None, graphdef: Any = None,
                     defaults: Mapping[str, Any] | None = None) -> list[Evaluator]:
    """All evaluators of ``config.eval`` (empty list when there is none)."""
    return [build_evaluator(n, e, mesh, tokenizer=tokenizer, graphdef=graphdef, defaults=defaults)
            for n, e in eval_entries(config)]


def run_evaluators(evaluators: Iterable[Evaluator], model_or_params: Any, step: int | None = None,
                   last_step: bool = False, progress: bool = False) -> dict[str, float]:
    """Run the evaluators due at ``step`` (all of them when ``step`` is None) and merge their metrics."""
    out: dict[str, float] = {}
    for ev in evaluators:
        if step is None or ev.should_run(step, last_step):
            out.update(ev.run(model_or_params, progress=progress))
    return out
