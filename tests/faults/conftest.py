"""Fixtures shared with tests/test_train_loop.py: its subprocess environment (one CPU device, the shared JAX
compilation cache) and its uninterrupted reference run (made once per session, under a file lock), so the
fault suite pays for no extra reference run."""

from tests.test_train_loop import env, reference  # noqa: F401
