"""Image-text retrieval Recall@k with several captions per image (spec ``evaluation.md`` §4.6, §9).

Ranks are computed block by block, so a 5k x 25k (COCO) or larger set never holds more than one
``image_chunk x text_chunk`` block of the score matrix, on device:

1. positives: ``pos[j]`` = score of caption j with its own image (``score_pairs``, chunked), and per
   image the best score among its own captions;
2. for every block S of (image chunk x caption chunk), on device:
   text->image: count images (other than the caption's own) with ``S > pos[j]``;
   image->text: count captions not of the image with ``S > best_own[i]``;
3. rank < k is a hit: text->image R@k (over captions), image->text R@k = "any caption of the image in
   the top k" (CLIP_benchmark's binarised per-query recall, averaged over images).

Blocks use the scoring adapter, so Llip's per-pair cross-attention is chunked the same way. Caption
chunks are sharded over the mesh's batch axes; image chunks are replicated. Every process computes the
same blocks on its devices and gets the same ranks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from evaluate import common, metrics, tasks
from evaluate.scoring import ScoringModel


def _pad_rows(tree: Any, n: int) -> Any:
    def one(x: np.ndarray) -> np.ndarray:
        if len(x) >= n:
            return x
        return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])

    return jax.tree.map(one, tree)


def _pad1(x: np.ndarray, n: int, value: Any) -> np.ndarray:
    return x if len(x) >= n else np.concatenate([x, np.full(n - len(x), value, x.dtype)])


@functools.lru_cache(maxsize=16)
def _block_fns(scoring: ScoringModel) -> tuple[Any, Any]:
    def pairs(model: Any, img: Any, txt: Any, temperature: float | None = None) -> jax.Array:
        return scoring.score_pairs(model, img, txt, temperature).astype(jnp.float32)

    def block(model: Any, img: Any, txt: Any, pos: jax.Array, best: jax.Array, rows: jax.Array,
              cols_owner: jax.Array, temperature: float | None = None) -> tuple[jax.Array, jax.Array]:
        s = scoring.score(model, img, txt, temperature).astype(jnp.float32)
        valid = (rows[:, None] >= 0) & (cols_owner[None, :] >= 0) & (rows[:, None] != cols_owner[None, :])
        t2i = jnp.sum((s > pos[None, :]) & valid, axis=0, dtype=jnp.int32)
        i2t = jnp.sum((s > best[:, None]) & valid, axis=1, dtype=jnp.int32)
        return t2i, i2t

    return (common.model_call(pairs, temperature=None), common.model_call(block, temperature=None))


def retrieval_ranks_chunked(model: Any, scoring: ScoringModel, image_side: Any, text_side: Any,
                            owner: np.ndarray, *, image_chunk: int = 1024, text_chunk: int = 4096,
                            temperature: float | None = None, mesh: Mesh | None = None,
                            progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(image->text ranks [Ni], text->image ranks [Nt]) from host-side embeddings, block by block.

    ``image_side`` / ``text_side`` are host pytrees with leading axis Ni / Nt; ``owner[j]`` is the image
    of caption j. Same definitions as ``metrics.retrieval_ranks`` (which needs the full matrix).
    """
    owner = np.asarray(owner, np.int32)
    n_img = len(jax.tree.leaves(image_side)[0])
    n_txt = len(owner)
    text_chunk = common.round_batch(min(text_chunk, n_txt), mesh)
    image_chunk = min(image_chunk, n_img)
    pairs_fn, block_fn = _block_fns(scoring)

    # 1. positives, chunked over captions
    pos = np.empty(n_txt, np.float32)
    for s in range(0, n_txt, text_chunk):
        idx = np.arange(s, min(s + text_chunk, n_txt))
        img = _pad_rows(jax.tree.map(lambda x, i=idx: x[owner[i]], image_side), text_chunk)
        txt = _pad_rows(jax.tree.map(lambda x, i=idx: x[i], text_side), text_chunk)
        out = pairs_fn(model, jax.tree.map(lambda x: common.put_batch(x, mesh), img),
                       jax.tree.map(lambda x: common.put_batch(x, mesh), txt), temperature=temperature)
        pos[idx] = common.to_host(out)[: len(idx)]
    best = metrics.best_own_scores(pos, owner, n_img).astype(np.float32)

    # 2. blocks
    t2i = np.zeros(n_txt, np.int64)
    i2t = np.zeros(n_img, np.int64)
    for si in range(0, n_img, image_chunk):
        ri = np.arange(si, min(si + image_chunk, n_img))
        img = jax.tree.map(lambda x: common.put_replicated(x, mesh),
                           _pad_rows(jax.tree.map(lambda x, r=ri: x[r], image_side), image_chunk))
        rows = common.put_replicated(_pad1(ri.astype(np.int32), image_chunk, -1), mesh)
        best_c = common.put_replicated(_pad1(best[ri], image_chunk, np.inf), mesh)
        i2t_acc = None
        for st in range(0, n_txt, text_chunk):
            ct = np.arange(st, min(st + text_chunk, n_txt))
            txt = jax.tree.map(lambda x: common.put_batch(x, mesh),
                               _pad_rows(jax.tree.map(lambda x, c=ct: x[c], text_side), text_chunk))
            pos_c = common.put_batch(_pad1(pos[ct], text_chunk, np.inf), mesh)
            own_c = common.put_batch(_pad1(owner[ct], text_chunk, -1), mesh)
            t2i_c, i2t_c = block_fn(model, img, txt, pos_c, best_c, rows, own_c, temperature=temperature)
            t2i[ct] += common.to_host(t2i_c)[: len(ct)]
            i2t_acc = i2t_c if i2t_acc is None else i2t_acc + i2t_c
            if progress is not None:
                progress.update(1)
        i2t[ri] += common.to_host(i2t_acc)[: len(ri)]
    return i2t, t2i


def embed_images(model: Any, scoring: ScoringModel, source: Any, *, batch_size: int, image_size: int,
                 mesh: Mesh | None = None, worker_count: int = 0, progress: Any = None
                 ) -> tuple[Any, np.ndarray]:
    """Image side of every example of ``source`` (host pytree [N, ...]) and a validity mask [N]
    (False for images that could not be decoded)."""
    from input_pipeline.eval_data import make_eval_iterator

    fn = _image_fn(scoring)
    it = make_eval_iterator(source, common.round_batch(batch_size, mesh), image_size, mesh=mesh,
                            worker_count=worker_count)
    n = len(source)
    side: Any = None
    valid = np.zeros(n, bool)
    try:
        for batch in it:
            host = common.to_host({"side": fn(model, batch["image"]), "mask": batch["mask"],
                                   "index": batch["index"]})
            keep = host["index"] >= 0
            idx = host["index"][keep]
            if side is None:
                side = jax.tree.map(lambda x: np.zeros((n,) + x.shape[1:], x.dtype), host["side"])
            for dst, src in zip(jax.tree.leaves(side), jax.tree.leaves(host["side"])):
                dst[idx] = src[keep]
            valid[idx] = host["mask"][keep]
            if progress is not None:
                progress.update(int(keep.sum()))
    finally:
        it.close()
    return side, valid


@functools.lru_cache(maxsize=16)
def _image_fn(scoring: ScoringModel) -> Any:
    return common.model_call(lambda m, x: scoring.image_embed(m, x))


@functools.lru_cache(maxsize=16)
def _text_fn(scoring: ScoringModel) -> Any:
    return common.model_call(lambda m, t: scoring.text_embed(m, t))


class RetrievalEvaluator(common.Evaluator):
    """Image<->text Recall@k on a caption set; ``run(model) -> {"<name>/<metric>": value}``.

    Metrics (percent): ``image_to_text_R@k``, ``text_to_image_R@k`` for ``ks``, ``mean_R@1`` (DataComp),
    mean / median ranks, ``num_images``, ``num_captions``. Images that fail to decode are dropped with
    their captions (``num_bad_images``). For Llip, ``temperatures`` sweeps τ (``tau<τ>/`` prefixes).
    """

    def __init__(self, name: str, data: Any, *, batch_size: int = 256, mesh: Mesh | None = None,
                 tokenizer: Any = None, ks: Sequence[int] = (1, 5, 10), image_chunk: int = 1024,
                 text_chunk: int = 4096, text_batch_size: int | None = None,
                 temperatures: Sequence[float] | None = None, max_examples: int | None = None,
                 every_steps: int | None = None, worker_count: int = 0,
                 scoring: ScoringModel | None = None, graphdef: Any = None, data_dir: str | None = None,
                 task: tasks.TaskInfo | str | None = None):
        self.name = name
        self.task = tasks.get_task(task or name) if not isinstance(task, tasks.TaskInfo) else task
        if isinstance(data, str | dict | tasks.DataSpec):
            data = tasks.DataSpec.parse(data, data_dir).build(self.task)
        self.source = common.subset(data, max_examples)
        self.texts, self.owner = self.source.flat_captions()
        if tokenizer is None:
            from metaclip_jax.tokenizer import ClipTokenizer

            tokenizer = ClipTokenizer()
        self.tokens = np.asarray(tokenizer(self.texts), np.int32)
        self.batch_size, self.text_batch_size = batch_size, text_batch_size or batch_size
        self.mesh = mesh
        self.ks = tuple(ks)
        self.image_chunk, self.text_chunk = image_chunk, text_chunk
        self.temperatures = tuple(temperatures) if temperatures else None
        self.every_steps = every_steps
        self.worker_count = worker_count
        self.scoring = scoring
        self.graphdef = graphdef

    def run(self, model_or_params: Any, progress: bool = False) -> dict[str, float]:
        model, scoring, temps = self.model_scoring_temperatures(model_or_params)
        bars: list[Any] = []

        def bar(total: int, desc: str, unit: str) -> Any:
            if not progress:
                return None
            from tqdm.auto import tqdm

            bars.append(tqdm(total=total, desc=f"{self.name}: {desc}", unit=unit, leave=False))
            return bars[-1]

        try:
            image_side, valid = embed_images(
                model, scoring, self.source, batch_size=self.batch_size,
                image_size=int(model.cfg.vision.image_size), mesh=self.mesh,
                worker_count=self.worker_count, progress=bar(len(self.source), "images", "img"))
            text_side = common.embed_texts(model, scoring, self.tokens, self.text_batch_size, self.mesh,
                                           _text_fn(scoring), bar(len(self.tokens), "captions", "cap"))
            owner = self.owner
            bad = int((~valid).sum())
            if bad:
                logging.warning("%s: %d images unreadable; dropped with their captions", self.name, bad)
                new_id = np.cumsum(valid) - 1
                keep_t = valid[owner]
                image_side = jax.tree.map(lambda x: x[valid], image_side)
                text_side = jax.tree.map(lambda x: x[keep_t], text_side)
                owner = new_id[owner[keep_t]].astype(np.int32)
            n_img = int(valid.sum())
            n_blocks = -(-n_img // self.image_chunk) * -(-len(owner) // self.text_chunk)
            out: dict[str, float] = {}
            for tau in temps:
                i2t, t2i = retrieval_ranks_chunked(
                    model, scoring, image_side, text_side, owner, image_chunk=self.image_chunk,
                    text_chunk=self.text_chunk, temperature=tau, mesh=self.mesh,
                    progress=bar(n_blocks, "blocks", "block"))
                m = metrics.to_percent(metrics.retrieval_metrics(i2t, t2i, self.ks))
                prefix = f"{self.name}/" if tau is None else f"{self.name}/tau{tau:g}/"
                out.update({prefix + k: v for k, v in m.items()})
        finally:
            for b in bars:
                b.close()
        out[f"{self.name}/num_images"] = float(n_img)
        out[f"{self.name}/num_captions"] = float(len(owner))
        out[f"{self.name}/num_bad_images"] = float(bad)
        return out
