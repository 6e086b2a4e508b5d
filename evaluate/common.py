"""Shared evaluator plumbing: global arrays on a mesh, host gathers, batched text embedding.

Multi-host contract: every process calls these functions with the same host data (prompts, captions) or
with its own slice of a global batch (images from ``input_pipeline.eval_data.make_eval_iterator``), runs
the same number of jitted calls, and gets the same gathered results back (``to_host``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metaclip_jax.sharding import batch_sharding, logical_to_spec


def batch_devices(mesh: Mesh | None) -> int:
    """How many ways the batch axis is split on ``mesh`` (1 without a mesh)."""
    if mesh is None:
        return 1
    spec = logical_to_spec(("batch",), None, mesh)
    names = spec[0] if len(spec) else None
    if names is None:
        return 1
    names = (names,) if isinstance(names, str) else names
    return int(np.prod([mesh.shape[n] for n in names]))


def round_batch(batch_size: int, mesh: Mesh | None) -> int:
    """``batch_size`` rounded up to a multiple of the batch-axis device count (and of processes)."""
    m = math.lcm(batch_devices(mesh), jax.process_count())
    return max(m, math.ceil(batch_size / m) * m)


def put_batch(x: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """A host array that every process holds in full -> a global array sharded over the batch axes."""
    if mesh is None:
        return jnp.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_replicated(x: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """A host array that every process holds in full -> a replicated global array."""
    if mesh is None:
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()), lambda idx: x[idx])


def to_host(tree: Any) -> Any:
    """Global arrays -> full numpy arrays on every process (``process_allgather`` when needed)."""
    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def model_call(fn: Callable[..., Any], **static: Any) -> Callable[..., Any]:
    """``nnx.jit`` of ``fn(model, *args)``; the compiled function is cached per model graph."""
    from flax import nnx

    return nnx.jit(fn, static_argnames=tuple(static)) if static else nnx.jit(fn)


def embed_texts(model: Any, scoring: Any, tokens: np.ndarray, batch_size: int, mesh: Mesh | None,
                text_fn: Callable[..., Any] | None = None, progress: Any = None) -> Any:
    """Text side of every row of ``tokens`` [N, L] as host numpy (pytree), in global batches."""
    n = len(tokens)
    g = round_batch(batch_size, mesh)
    fn = text_fn or model_call(lambda m, t: scoring.text_embed(m, t))
    parts = []
    for start in range(0, n, g):
        chunk = tokens[start:start + g]
        pad = g - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out = to_host(fn(model, put_batch(chunk, mesh)))
        parts.append(jax.tree.map(lambda x, k=g - pad: x[:k], out))
        if progress is not None:
            progress.update(g - pad)
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def as_model(model_or_params: Any, graphdef: Any = None) -> Any:
    """An ``nnx.Module`` from a module, a ``(graphdef, state)`` pair, or a state plus ``graphdef``."""
    from flax import nnx

    if isinstance(model_or_params, nnx.Module):
        return model_or_params
    if isinstance(model_or_params, tuple) and len(model_or_params) == 2:
        return nnx.merge(*model_or_params)
    if graphdef is None:
        raise TypeError("run() needs an nnx.Module or (graphdef, state); got parameters without a graphdef "
                        "(pass graphdef= to build_evaluators)")
    return nnx.merge(graphdef, model_or_params)


def subset(source: Any, n: int | None) -> Any:
    """The first ``n`` examples of an eval source (the source itself when ``n`` is None or larger)."""
    if n is None or n >= len(source):
        return source
    from input_pipeline import eval_data

    if isinstance(source, eval_data.CaptionSource):
        return eval_data.CaptionSource(source.image_paths[:n], source.captions[:n])
    return _Subset(source, n)


class _Subset:
    def __init__(self, source: Any, n: int):
        self._source, self._n = source, n
        self.classes = getattr(source, "classes", None)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._source[i]


class Evaluator:
    """Base class: ``run(model) -> {"<name>/<metric>": value}`` (percent, except ranks and counts).

    ``every_steps``: the training loop runs it when ``should_run(step)``; None or 0 = only when asked
    (``should_run`` is then False except on the last step).
    """

    name: str = "eval"
    every_steps: int | None = None
    graphdef: Any = None

    def should_run(self, step: int, last_step: bool = False) -> bool:
        """True on multiples of ``every_steps`` (step > 0) and on the final step."""
        if last_step:
            return True
        return bool(self.every_steps) and step > 0 and step % int(self.every_steps) == 0

    scoring: Any = None
    temperatures: tuple[float, ...] | None = None

    def model_scoring_temperatures(self, model_or_params: Any) -> tuple[Any, Any, tuple[float | None, ...]]:
        """The model, its scoring adapter and the attention temperatures to sweep ((None,) = default)."""
        from evaluate.scoring import scoring_for

        model = as_model(model_or_params, self.graphdef)
        scoring = self.scoring or scoring_for(model)
        temps: tuple[float | None, ...] = (None,)
        if scoring.has_temperature and self.temperatures:
            temps = tuple(self.temperatures)
        return model, scoring, temps

    def run(self, model_or_params: Any, progress: bool = False) -> dict[str, float]:
        raise NotImplementedError
