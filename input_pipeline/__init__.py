"""Grain input pipeline: curated ArrayRecord shards -> global jax.Array batches; eval readers.

Public API (see docs/input_pipeline.md):

- ``TrainDataConfig``, ``make_train_iterator(config, mesh, process_index, process_count)``
  -> ``TrainIterator`` yielding ``{"image", "text"}`` global arrays, with ``.stats`` / ``.last_stats``
  host counters, ``get_state()`` / ``set_state()``; ``save_state(it) -> bytes``, ``restore_state(it, data)``.
- ``eval_data``: ``ImageFolderSource``, ``TfdsSource``, ``coco_captions``, ``flickr_captions``,
  ``make_eval_iterator``.
"""

from input_pipeline.train_data import (
    SKIP_REASONS,
    TrainDataConfig,
    TrainIterator,
    build_dataset,
    expand_paths,
    make_train_iterator,
    restore_state,
    save_state,
    to_global,
)

__all__ = [
    "SKIP_REASONS",
    "TrainDataConfig",
    "TrainIterator",
    "build_dataset",
    "expand_paths",
    "make_train_iterator",
    "restore_state",
    "save_state",
    "to_global",
]
