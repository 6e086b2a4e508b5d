"""Zero-shot classification (spec ``evaluation.md`` §2, §3, §4, §9).

Classifier (§2.2): every class's prompts (templates x synonyms) are embedded and reduced by the scoring
adapter: CLIP normalises each prompt embedding, averages and renormalises; Llip averages the queries and
ensembles the normalised targets (§9). Prompts are embedded once per run in global batches sharded over
the mesh's batch axes, and summed per class on device (``segment_sum``), so the prompt embeddings never
leave the accelerators. The class matrix is sharded over the ``tensor`` axis when that axis is larger
than 1 and divides the class count, and replicated otherwise.

Images come from ``input_pipeline.eval_data.make_eval_iterator`` (same batch count on every process,
padding masked); per batch only the top-5 class indices (and ``L1 - L0`` for two-class tasks) are
gathered to the hosts. Metrics per task (§3/§4): top-1, top-5, mean per-class recall, (top1+top5)/2 and
ROC-AUC; ``score`` is the task's headline metric (mean per-class recall for Aircraft, Pets, Caltech101,
Flowers; (top1+top5)/2 for Kinetics700; ROC-AUC of L1-L0 for HatefulMemes; top-1 otherwise).

Llip: ``temperatures=(1, 3, 5, 8, 10)`` sweeps the attention temperature in the same image pass
(metrics under ``tau<τ>/``); ``class_chunk`` bounds the [B, C, D] contextual embeddings.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from evaluate import common, metrics, tasks
from evaluate.scoring import ScoringModel


@functools.lru_cache(maxsize=32)
def _prompt_sum_fn(scoring: ScoringModel, num_classes: int) -> Any:
    def fn(model: Any, tokens: jax.Array, owner: jax.Array) -> Any:
        feats = scoring.prompt_features(scoring.text_embed(model, tokens))
        return jax.tree.map(
            lambda x: jax.ops.segment_sum(x.astype(jnp.float32), owner, num_segments=num_classes + 1)[
                :num_classes], feats)

    return common.model_call(fn)


@functools.lru_cache(maxsize=32)
def _finalize_fn(scoring: ScoringModel) -> Any:
    def fn(sums: Any, counts: jax.Array) -> Any:
        mean = jax.tree.map(lambda s: s / counts.reshape((-1,) + (1,) * (s.ndim - 1)), sums)
        return scoring.class_features(mean)

    return jax.jit(fn)


def class_sharding(mesh: Mesh | None, num_classes: int) -> NamedSharding | None:
    """Classes over the ``tensor`` axis when it is > 1 and divides C; replicated otherwise."""
    if mesh is None:
        return None
    t = mesh.shape.get("tensor", 1)
    spec = PartitionSpec("tensor") if t > 1 and num_classes % t == 0 else PartitionSpec()
    return NamedSharding(mesh, spec)


def build_classifier(model: Any, scoring: ScoringModel, classnames: Sequence[tasks.Label],
                     templates: Sequence[str], tokenizer: Any, *, batch_size: int = 256,
                     mesh: Mesh | None = None, progress: Any = None) -> Any:
    """The class side (pytree of [C, ...] arrays) of a zero-shot classifier (spec §2.2 / §9)."""
    prompts, owner = tasks.expand_prompts(classnames, templates)
    c = len(classnames)
    tokens = np.asarray(tokenizer(prompts), np.int32)
    owner_arr = np.asarray(owner, np.int32)
    g = common.round_batch(batch_size, mesh)
    fn = _prompt_sum_fn(scoring, c)
    sums = None
    for start in range(0, len(prompts), g):
        tok = tokens[start:start + g]
        own = owner_arr[start:start + g]
        pad = g - len(tok)
        if pad:
            tok = np.concatenate([tok, np.zeros((pad, tok.shape[1]), np.int32)])
            own = np.concatenate([own, np.full(pad, c, np.int32)])      # segment C is dropped
        s = fn(model, common.put_batch(tok, mesh), common.put_batch(own, mesh))
        sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
        jax.block_until_ready(sums)
        if progress is not None:
            progress.update(g - pad)
    counts = common.put_replicated(np.bincount(owner_arr, minlength=c).astype(np.float32), mesh)
    side = _finalize_fn(scoring)(sums, counts)
    sharding = class_sharding(mesh, c)
    if sharding is not None:
        side = jax.jit(lambda x: x, out_shardings=sharding)(side)
    return side


def _take(tree: Any, start: int, stop: int) -> Any:
    return jax.tree.map(lambda x: x[start:stop], tree)


class ClassifierScorer:
    """Jitted image embedding + logits + top-k, compiled once per (model graph, scoring, task shape)."""

    def __init__(self, scoring: ScoringModel, num_classes: int, class_chunk: int | None = None):
        self.scoring = scoring
        self.num_classes = num_classes
        self.k = min(5, num_classes)
        self.class_chunk = class_chunk if class_chunk and class_chunk < num_classes else None
        self.embed = common.model_call(lambda m, x: scoring.image_embed(m, x))
        self.logits = common.model_call(
            lambda m, img, cls, temperature: scoring.score(m, img, cls, temperature),
            temperature=None)

        def top(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
            _, idx = jax.lax.top_k(logits, self.k)
            margin = logits[:, 1] - logits[:, 0] if num_classes == 2 else jnp.zeros(logits.shape[:1])
            return idx.astype(jnp.int32), margin.astype(jnp.float32)

        self.top = jax.jit(top)

    def __call__(self, model: Any, images: jax.Array, class_side: Any,
                 temperatures: Sequence[float | None]) -> list[tuple[jax.Array, jax.Array]]:
        img = self.embed(model, images)
        out = []
        for tau in temperatures:
            if self.class_chunk is None:
                logits = self.logits(model, img, class_side, temperature=tau)
            else:
                parts = [self.logits(model, img, _take(class_side, s, s + self.class_chunk), temperature=tau)
                         for s in range(0, self.num_classes, self.class_chunk)]
                logits = jnp.concatenate(parts, axis=1)
            out.append(self.top(logits))
        return out


def classify(model: Any, scorer: ClassifierScorer, class_side: Any, iterator: Any,
             temperatures: Sequence[float | None] = (None,), progress: Any = None
             ) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, int]:
    """Run the images of ``iterator``; returns (per temperature (top-k [N, k], margin [N])), labels [N],
    and the number of masked-out real examples (unreadable images). Padding is dropped."""
    tops: list[list[np.ndarray]] = [[] for _ in temperatures]
    margins: list[list[np.ndarray]] = [[] for _ in temperatures]
    labels, masks, indices = [], [], []
    for batch in iterator:
        outs = scorer(model, batch["image"], class_side, temperatures)
        host = common.to_host({"out": outs, "label": batch["label"], "mask": batch["mask"],
                               "index": batch["index"]})
        for j, (t, m) in enumerate(host["out"]):
            tops[j].append(t)
            margins[j].append(m)
        labels.append(host["label"])
        masks.append(host["mask"])
        indices.append(host["index"])
        if progress is not None:
            progress.update(int(host["mask"].sum()))
    mask = np.concatenate(masks).astype(bool)
    index = np.concatenate(indices)
    bad = int(np.sum((index >= 0) & ~mask))
    results = [(np.concatenate(t)[mask], np.concatenate(m)[mask]) for t, m in zip(tops, margins)]
    return results, np.concatenate(labels)[mask], bad


class ZeroShotEvaluator(common.Evaluator):
    """Zero-shot classification of one dataset; ``run(model) -> {"<name>/<metric>": percent}``.

    Args:
      name: metric prefix. task: a ``tasks.TaskInfo`` or task name (selects prompts and headline metric).
      data: a ``tasks.DataSpec`` (or its string / dict form), or an eval source object.
      batch_size: global image batch. text_batch_size: global prompt batch.
      mesh: the device mesh (None = one device, numpy batches).
      tokenizer: ``texts -> int32 [N, L]`` (default: ``ClipTokenizer()``).
      classnames_file / templates_file / classnames / templates: prompt overrides (``tasks.resolve_prompts``).
      temperatures: Llip attention temperatures to sweep (ignored for CLIP); None = the model's default.
      class_chunk: score classes in chunks of this size (Llip memory). max_examples: evaluate a prefix.
      every_steps: in-loop cadence. worker_count: Grain worker processes for image decoding.
      scoring: adapter override (default: ``scoring_for(model)``).
    """

    def __init__(self, name: str, task: tasks.TaskInfo | str, data: Any, *, batch_size: int = 256,
                 mesh: Mesh | None = None, tokenizer: Any = None, classnames_file: str | None = None,
                 templates_file: str | None = None, classnames: Sequence[tasks.Label] | None = None,
                 templates: Sequence[str] | None = None, temperatures: Sequence[float] | None = None,
                 class_chunk: int | None = None, text_batch_size: int | None = None,
                 max_examples: int | None = None, every_steps: int | None = None, worker_count: int = 0,
                 scoring: ScoringModel | None = None, graphdef: Any = None, data_dir: str | None = None):
        self.name = name
        self.task = tasks.get_task(task) if isinstance(task, str) else task
        if isinstance(data, str | dict | tasks.DataSpec):
            data = tasks.DataSpec.parse(data, data_dir).build(self.task)
        self.source = common.subset(data, max_examples)
        self.classnames, self.templates, self.prompt_origin = tasks.resolve_prompts(
            self.task, getattr(self.source, "classes", None), classnames_file, templates_file,
            classnames, templates)
        self.num_classes = len(self.classnames)
        if self.task.main_metric == "roc_auc" and self.num_classes != 2:
            raise ValueError(f"task {self.task.name}: ROC-AUC needs 2 classes, got {self.num_classes}")
        if tokenizer is None:
            from metaclip_jax.tokenizer import ClipTokenizer

            tokenizer = ClipTokenizer()
        self.tokenizer = tokenizer
        self.batch_size, self.text_batch_size = batch_size, text_batch_size or batch_size
        self.mesh = mesh
        self.temperatures = tuple(temperatures) if temperatures else None
        self.class_chunk = class_chunk
        self.every_steps = every_steps
        self.worker_count = worker_count
        self.scoring = scoring
        self.graphdef = graphdef
        self._scorers: dict[int, ClassifierScorer] = {}
        if (n := len(self.templates)) != tasks.METACLIP_TEMPLATE_COUNTS.get(self.task.metaclip or "", n):
            logging.info("%s: %d templates (%s); the MetaCLIP suite uses %d", self.name, n,
                         self.prompt_origin["templates"], tasks.METACLIP_TEMPLATE_COUNTS[self.task.metaclip])

    @property
    def num_prompts(self) -> int:
        return sum(len(c) if isinstance(c, list) else 1 for c in self.classnames) * len(self.templates)

    def run(self, model_or_params: Any, progress: bool = False) -> dict[str, float]:
        from input_pipeline.eval_data import make_eval_iterator

        model, scoring, temps = self.model_scoring_temperatures(model_or_params)
        pbar_t = pbar_i = None
        if progress:
            from tqdm.auto import tqdm

            pbar_t = tqdm(total=self.num_prompts, desc=f"{self.name}: prompts", unit="prompt", leave=False)
        class_side = build_classifier(model, scoring, self.classnames, self.templates, self.tokenizer,
                                      batch_size=self.text_batch_size, mesh=self.mesh, progress=pbar_t)
        if pbar_t is not None:
            pbar_t.close()
        key = id(scoring)
        if key not in self._scorers:
            self._scorers = {key: ClassifierScorer(scoring, self.num_classes, self.class_chunk)}
        image_size = int(model.cfg.vision.image_size)
        it = make_eval_iterator(self.source, common.round_batch(self.batch_size, self.mesh), image_size,
                                mesh=self.mesh, worker_count=self.worker_count)
        if progress:
            from tqdm.auto import tqdm

            pbar_i = tqdm(total=len(self.source), desc=f"{self.name}: images", unit="img", leave=False)
        try:
            results, labels, bad = classify(model, self._scorers[key], class_side, it, temps, pbar_i)
        finally:
            it.close()
            if pbar_i is not None:
                pbar_i.close()
        out: dict[str, float] = {}
        for tau, (top, margin) in zip(temps, results):
            m = metrics.to_percent(metrics.classification_metrics(
                top, labels, self.num_classes, self.task.main_metric,
                margin if self.num_classes == 2 else None))
            prefix = f"{self.name}/" if tau is None else f"{self.name}/tau{tau:g}/"
            out.update({prefix + k: v for k, v in m.items()})
        out[f"{self.name}/num_examples"] = float(len(labels))
        out[f"{self.name}/num_bad_images"] = float(bad)
        return out
