"""Grain training pipeline: curated ArrayRecord shards -> global ``jax.Array`` batches on the mesh.

Pipeline (one per data-loading process; see docs/input_pipeline.md)::

    MapDataset.range(N)                         record indices of ArrayRecordDataSource(paths)
      .shuffle(seed).repeat(num_epochs)         global shuffle, new order per epoch (Grain folds in the epoch)
      .map_with_index(-> (epoch, record))       the epoch is position // N
      [process_index::process_count]            per-process slice (disjoint, covers every epoch)
      .map(_DecodeExample)                      read + msgpack decode + caption draw + online balancing
                                                + decode / RandomResizedCrop -> uint8;
                                                rng = f(seed, epoch, record) only
      .to_iter_dataset(ReadOptions(threads))
      -> _SkipCountingBatch(per_process_batch)  drops skipped examples, counts them by reason, tokenizes
      .mp_prefetch(workers)                     worker processes (each handles a slice; deterministic)
      -> ThreadPrefetch(prefetch)               a few ready batches in the main process
    TrainIterator                               numpy -> make_array_from_process_local_data(batch_sharding)

Skipped records travel *inside* each worker batch as an int64 vector ``skipped`` (one slot per reason in
``SKIP_REASONS``): counts of the records the worker dropped while filling that batch. They therefore cross
the process boundary with the data, survive any worker count, and are exactly reproducible on resume. The
main process sums them into ``TrainIterator.stats`` (cumulative, also saved in the iterator state) and
``TrainIterator.last_stats`` (this batch). Counts are per process; sum over processes if wanted.
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from input_pipeline import transforms
from metaclip_jax import records

# Reasons a record is dropped. "balanced_out" is online balancing's reject, not an error.
SKIP_REASONS = ("bad_record", "no_text", "no_image", "corrupt_image", "too_large", "balanced_out")
_REASON_INDEX = {r: i for i, r in enumerate(SKIP_REASONS)}
_GLOB_CHARS = set("*?[")


# ----------------------------------------------------------------------------------------------- config

@dataclasses.dataclass
class TrainDataConfig:
    """Everything the training pipeline reads. Accepts a ConfigDict/dict via ``from_mapping``."""

    paths: Sequence[str] | str = ()          # ArrayRecord files, globs or folders (local or gs://)
    global_batch_size: int = 256
    image_size: int = 224
    context_length: int = 77
    seed: int = 0
    num_epochs: int | None = None            # None: repeat forever (training runs by steps)
    online_balancing: bool = True            # keep the drawn text with its stored keep_prob
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    image_dtype: str = "uint8"               # "uint8" (normalise on device) or "float32" (normalised here)
    draft_decode: bool = True                # reduced-size JPEG decode (DCT scaling) when the crop allows
    draft_min_scale: float = 0.9             # JPEG decode scale keeps the crop >= this * image_size (1.0:
                                             # never upsample; 0.9 lets 640x480 photos decode at 1/2)
    resize_backend: str = "auto"             # "pil" | "cv2" | "auto" (cv2 when installed), see transforms
    jpeg_decoder: str = "auto"               # "simplejpeg" | "pil" | "auto" (simplejpeg when installed)
    max_pixels: int = transforms.DEFAULT_MAX_PIXELS
    worker_count: int = 0                    # Grain worker processes (0: decode in the main process)
    worker_buffer_size: int = 2              # batches buffered per worker
    read_threads: int = 1                    # threads per process/worker reading + decoding examples
    read_buffer_size: int = 64               # examples prefetched by those threads
    prefetch: int = 2                        # ready batches buffered in the main process (thread)
    tokenizer: str = "clip"                  # "clip" (metaclip_jax.tokenizer) or "bytes" (debug only)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | TrainDataConfig) -> TrainDataConfig:
        if isinstance(cfg, TrainDataConfig):
            return cfg
        items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ValueError(f"unknown input pipeline config keys {unknown}; known: {sorted(names)}")
        return cls(**items)

    def validate(self) -> None:
        if self.image_dtype not in ("uint8", "float32"):
            raise ValueError(f"image_dtype must be 'uint8' or 'float32', got {self.image_dtype!r}")
        if self.global_batch_size <= 0:
            raise ValueError("global_batch_size must be positive")
        if self.resize_backend not in ("auto", "pil", "cv2"):
            raise ValueError(f"resize_backend must be 'auto', 'pil' or 'cv2', got {self.resize_backend!r}")
        if self.jpeg_decoder not in ("auto", "pil", "simplejpeg"):
            raise ValueError(f"jpeg_decoder must be 'auto', 'pil' or 'simplejpeg', got {self.jpeg_decoder!r}")
        if self.tokenizer not in ("clip", "bytes"):
            raise ValueError(f"tokenizer must be 'clip' or 'bytes', got {self.tokenizer!r}")


# ------------------------------------------------------------------------------------------------ paths

def expand_paths(paths: Sequence[str] | str) -> list[str]:
    """Expand globs and folders (local or gs://, via etils.epath when not local); keep plain paths as given.

    A folder expands to its ``*.array_record*`` files. The result is sorted per pattern so every process
    sees the same order.
    """
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    out: list[str] = []
    for p in paths:
        p = str(p)
        remote = "://" in p
        if not remote:
            if os.path.isdir(p):
                out.extend(sorted(_glob.glob(os.path.join(p, "*.array_record*"))))
            elif _GLOB_CHARS & set(p):
                out.extend(sorted(_glob.glob(p)))
            else:
                out.append(p)
            continue
        from etils import epath

        if _GLOB_CHARS & set(p):
            parts = p.split("/")
            k = next(i for i, s in enumerate(parts) if _GLOB_CHARS & set(s))
            base = epath.Path("/".join(parts[:k]))
            out.extend(sorted(str(x) for x in base.glob("/".join(parts[k:]))))
        else:
            out.append(p)
    if not out:
        raise FileNotFoundError(f"no ArrayRecord files match {list(paths)}")
    return out


# ---------------------------------------------------------------------------------------- per example

def example_rng(seed: int, epoch: int, record: int) -> np.random.Generator:
    """The only source of randomness for one visit: a pure function of (seed, epoch, record index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(record)]))


class _EpochTag(grain.transforms.MapWithIndex):
    def __init__(self, n: int):
        self._n = n

    def map_with_index(self, index: int, record: int) -> tuple[int, int]:
        return index // self._n, int(record)


def _skip(reason: str) -> dict[str, Any]:
    return {"skip": _REASON_INDEX[reason]}


class _DecodeExample(grain.transforms.Map):
    """(epoch, record index) -> {image uint8, caption, epoch, record} or {skip: reason index}."""

    def __init__(self, source: Any, cfg: TrainDataConfig):
        self._source = source
        self._cfg = cfg

    def map(self, element: tuple[int, int]) -> dict[str, Any]:
        epoch, idx = element
        cfg = self._cfg
        try:
            rec = records.decode(self._source[idx])
        except Exception:  # RecordError, a torn file or any reader error: count it, do not kill the run
            return _skip("bad_record")
        candidates = [i for i, t in enumerate(rec.texts) if isinstance(t, str) and t.strip()]
        if not candidates:
            return _skip("no_text")
        if not rec.image:
            return _skip("no_image")
        rng = example_rng(cfg.seed, epoch, idx)
        t = candidates[int(rng.integers(len(candidates)))]
        u = rng.random()  # always drawn, so the crop draws do not depend on the balancing switch
        if cfg.online_balancing:
            p = float(rec.keep_prob[t])
            if p < 1.0 and u >= p:
                return _skip("balanced_out")
        try:
            image = transforms.train_image(rec.image, cfg.image_size, rng, scale=tuple(cfg.scale),
                                           ratio=tuple(cfg.ratio), max_pixels=cfg.max_pixels,
                                           draft=cfg.draft_decode, draft_min_scale=cfg.draft_min_scale,
                                           resize_backend=cfg.resize_backend, jpeg_decoder=cfg.jpeg_decoder)
        except transforms.ImageTooLarge:
            return _skip("too_large")
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            if type(e).__name__.startswith("DecompressionBomb"):
                return _skip("too_large")
            return _skip("corrupt_image")
        return {"image": image, "caption": rec.texts[t], "epoch": epoch, "record": idx, "skip": -1}


# ------------------------------------------------------------------------------------ batching + counts

_TOKENIZERS: dict[tuple[str, int], Any] = {}


def _bytes_tokenize(texts: Sequence[str], context_length: int) -> np.ndarray:
    out = np.zeros((len(texts), context_length), np.int32)
    for i, t in enumerate(texts):
        b = np.frombuffer(t.encode("utf-8")[: context_length - 2], np.uint8).astype(np.int32) + 1
        out[i, 0] = 257
        out[i, 1:1 + len(b)] = b
        out[i, 1 + len(b)] = 258
    return out


def get_tokenizer(kind: str, context_length: int):
    """A callable list[str] -> int32 [N, context_length], cached per process (workers build their own)."""
    key = (kind, context_length)
    if key not in _TOKENIZERS:
        if kind == "clip":
            from metaclip_jax.tokenizer import ClipTokenizer

            _TOKENIZERS[key] = ClipTokenizer(context_length=context_length, truncate="eot")
        else:
            _TOKENIZERS[key] = lambda texts: _bytes_tokenize(texts, context_length)
    return _TOKENIZERS[key]


def _make_batch(examples: list[dict[str, Any]], counts: np.ndarray, cfg: TrainDataConfig) -> dict:
    images = np.stack([e["image"] for e in examples])
    if cfg.image_dtype == "float32":
        images = transforms.normalize(images)
    text = np.asarray(get_tokenizer(cfg.tokenizer, cfg.context_length)([e["caption"] for e in examples]),
                      dtype=np.int32)
    return {
        "image": images,
        "text": text,
        "epoch": np.asarray([e["epoch"] for e in examples], np.int64),
        "record": np.asarray([e["record"] for e in examples], np.int64),
        "skipped": counts,
    }


class _SkipCountingBatchIterator(grain.DatasetIterator):
    """Fills batches of exactly ``batch_size`` kept examples; counts the dropped ones by reason.

    Its state is the parent's: a state is only ever taken between batches, when nothing is buffered.
    """

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, cfg: TrainDataConfig):
        super().__init__(parent)
        self._batch_size = batch_size
        self._cfg = cfg

    def __next__(self) -> dict[str, np.ndarray]:
        kept: list[dict[str, Any]] = []
        counts = np.zeros(len(SKIP_REASONS), np.int64)
        while len(kept) < self._batch_size:
            e = next(self._parent)  # StopIteration ends the stream; a partial batch is dropped
            if e["skip"] >= 0:
                counts[e["skip"]] += 1
            else:
                kept.append(e)
        return _make_batch(kept, counts, self._cfg)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class _SkipCountingBatch(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int, cfg: TrainDataConfig):
        super().__init__(parent)
        self._batch_size = batch_size
        self._cfg = cfg

    def __iter__(self) -> _SkipCountingBatchIterator:
        return _SkipCountingBatchIterator(self._parent.__iter__(), self._batch_size, self._cfg)

    def __str__(self) -> str:
        return f"SkipCountingBatch(batch_size={self._batch_size})"


def build_dataset(cfg: TrainDataConfig | Mapping[str, Any], process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
    """The per-process Grain ``IterDataset`` of host numpy batches (no jax involved)."""
    cfg = TrainDataConfig.from_mapping(cfg)
    cfg.validate()
    if cfg.global_batch_size % process_count:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by "
                         f"process_count {process_count}")
    source = grain.sources.ArrayRecordDataSource(expand_paths(cfg.paths))
    n = len(source)
    if n == 0:
        raise ValueError("the ArrayRecord files hold no records")
    ds = grain.MapDataset.range(n).shuffle(seed=cfg.seed).repeat(cfg.num_epochs)
    ds = ds.map_with_index(_EpochTag(n))
    ds = ds[process_index::process_count]
    ds = ds.map(_DecodeExample(source, cfg))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                 prefetch_buffer_size=cfg.read_buffer_size))
    it_ds = _SkipCountingBatch(it_ds, cfg.global_batch_size // process_count, cfg)
    if cfg.worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
    if cfg.prefetch > 0:
        it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=cfg.prefetch)
    return it_ds


# -------------------------------------------------------------------------------------- global arrays

def to_global(local: Mapping[str, np.ndarray], mesh: Any, global_batch_size: int) -> dict[str, Any]:
    """Per-process numpy batch -> global ``jax.Array``s, batch axis over the mesh's batch axes."""
    import jax

    from metaclip_jax.sharding import batch_sharding

    out = {}
    for k, v in local.items():
        sharding = batch_sharding(mesh, v.ndim)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
    return out


class TrainIterator:
    """Yields ``{"image": jax.Array [B,S,S,3] uint8|float32, "text": jax.Array int32 [B,77]}``.

    Host-side counters (this process): ``stats`` (cumulative, part of the saved state) and ``last_stats``
    (the batch just returned), both ``{"skipped/<reason>": int, "examples": int, "epoch": int}``;
    ``last_host`` holds the host-only per-example fields (``epoch``, ``record``) of the last batch.
    With ``mesh=None`` the batch stays numpy (per-process).
    """

    ARRAY_KEYS = ("image", "text")

    def __init__(self, dataset: grain.IterDataset, mesh: Any, global_batch_size: int):
        self._ds = dataset
        self._it = iter(dataset)
        self._mesh = mesh
        self._global_batch_size = global_batch_size
        self._totals = {f"skipped/{r}": 0 for r in SKIP_REASONS}
        self._totals.update(examples=0, batches=0, epoch=0)
        self.last_stats: dict[str, int] = {}
        self.last_host: dict[str, np.ndarray] = {}

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        local = next(self._it)
        last = {f"skipped/{r}": int(c) for r, c in zip(SKIP_REASONS, local["skipped"])}
        last["examples"] = len(local["record"])
        last["epoch"] = int(local["epoch"].max())
        for k, v in last.items():
            self._totals[k] = max(self._totals[k], v) if k == "epoch" else self._totals[k] + v
        self._totals["batches"] += 1
        self.last_stats = last
        self.last_host = {"epoch": local["epoch"], "record": local["record"]}
        arrays = {k: local[k] for k in self.ARRAY_KEYS}
        if self._mesh is None:
            return arrays
        return to_global(arrays, self._mesh, self._global_batch_size)

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._totals)

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._it.get_state(), "totals": dict(self._totals)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._it.set_state(state["grain"])
        self._totals = dict(state["totals"])

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def save_state(it: TrainIterator) -> bytes:
    """Iterator state as JSON bytes (store it as its own Orbax item, one per data-loading process)."""
    return json.dumps(it.get_state(), sort_keys=True).encode("utf-8")


def restore_state(it: TrainIterator, data: bytes) -> None:
    it.set_state(json.loads(data.decode("utf-8") if isinstance(data, bytes | bytearray) else data))


def make_train_iterator(config: TrainDataConfig | Mapping[str, Any], mesh: Any = None,
                        process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
    """The training iterator for this process; ``process_*`` default to jax's values."""
    cfg = TrainDataConfig.from_mapping(config)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    ds = build_dataset(cfg, process_index, process_count)
    return TrainIterator(ds, mesh, cfg.global_batch_size)
