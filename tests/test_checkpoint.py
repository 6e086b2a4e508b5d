"""train/checkpoint.py: restore onto another mesh, damaged-checkpoint fallback, fingerprints, metadata."""

from __future__ import annotations

import glob
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from metaclip_jax import sharding
from train.checkpoint import DAMAGED_DIR, Checkpointer, build_metadata, fingerprint


class FakeIterator:
    """Stands in for input_pipeline.TrainIterator: JSON-able get_state / set_state."""

    def __init__(self, position: int = 0):
        self.position = position

    def get_state(self) -> dict:
        return {"grain": {"next_index": self.position}, "totals": {"examples": self.position}}

    def set_state(self, state: dict) -> None:
        self.position = state["grain"]["next_index"]


def _tiny_config(**over):
    from metaclip_jax.config_schema import load_config

    args = [f"--config.{k}={v}" for k, v in over.items()]
    return load_config("configs/tiny.py", args)


def _mesh(n: int, fsdp: int) -> jax.sharding.Mesh:
    return sharding.make_mesh(data=n // fsdp, fsdp=fsdp, devices=jax.devices()[:n])


def test_restore_onto_other_mesh(tmp_path):
    """Save a TrainState on a 2-device FSDP mesh; restore it on 4 and 1 devices into their shardings."""
    from train.state import abstract_train_state, create_train_state

    config = _tiny_config()
    mesh2 = _mesh(2, fsdp=2)
    state, _ = create_train_state(config, mesh2)
    w = state.params["visual"]
    sharded = [x for x in jax.tree.leaves(w) if not x.sharding.is_fully_replicated]
    assert sharded, "expected some params sharded over fsdp on the 2-device mesh"
    ckpt = Checkpointer(str(tmp_path), every_steps=1, max_to_keep=2, async_save=True)
    ckpt.save(7, state, FakeIterator(112), {"model_type": "clip"}, {"train_seconds": 1.5})
    ckpt.wait()
    expected = jax.device_get(state)
    for n, fsdp in ((4, 4), (1, 1)):
        mesh = _mesh(n, fsdp=fsdp)
        abstract, shardings = abstract_train_state(config, mesh)
        it = FakeIterator()
        restored = Checkpointer(str(tmp_path), every_steps=1).restore_latest(abstract, it)
        assert restored is not None and restored.step == 7 and it.position == 112
        assert restored.counters["train_seconds"] == 1.5
        got = jax.device_get(restored.state)
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
            np.testing.assert_array_equal(a, b)
        for leaf, sh in zip(jax.tree.leaves(restored.state), jax.tree.leaves(shardings)):
            assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
            assert set(leaf.sharding.device_set) == set(mesh.devices.flat)
    ckpt.close()


def _small_state(scale: float) -> dict:
    mesh = _mesh(1, 1)
    sh = NamedSharding(mesh, PartitionSpec())
    return {
        "w": jax.device_put(jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) * scale, sh),
        "step": jax.device_put(jnp.int32(scale), sh),
    }


def _abstract(state: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _two_checkpoints(workdir: str) -> Checkpointer:
    ckpt = Checkpointer(workdir, every_steps=1, max_to_keep=5, async_save=True)
    for s in (1, 2):
        ckpt.save(s, _small_state(float(s)), FakeIterator(10 * s), {"model_type": "clip"}, {"n": s})
    ckpt.close()
    return Checkpointer(workdir, every_steps=1, max_to_keep=5)


def _largest(pattern: str) -> str:
    return max(glob.glob(pattern), key=os.path.getsize)


def _truncate(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _flip(path: str) -> None:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


DAMAGE = {
    # truncated array data file: tensorstore fails to read the chunk
    "truncated-array-data": lambda d: _truncate(_largest(f"{d}/state/ocdbt.process_0/d/*")),
    # a flipped byte inside compressed array data restores silently: the fingerprint catches it
    "flipped-array-byte": lambda d: _flip(_largest(f"{d}/state/ocdbt.process_0/d/*")),
    # torn JSON items
    "truncated-metadata-json": lambda d: _truncate(f"{d}/metadata/metadata"),
    "corrupt-data-iter-json": lambda d: _flip(glob.glob(f"{d}/data_iter/*.json")[0]),
    "truncated-tree-metadata": lambda d: _truncate(f"{d}/state/_METADATA"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_falls_back(tmp_path, caplog, damage):
    workdir = str(tmp_path)
    ckpt = _two_checkpoints(workdir)
    DAMAGE[damage](os.path.join(workdir, "checkpoints", "2"))
    it = FakeIterator()
    with caplog.at_level(logging.ERROR, logger="train.checkpoint"):
        restored = ckpt.restore_latest(_abstract(_small_state(1.0)), it)
    assert restored is not None and restored.step == 1
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.asarray(_small_state(1.0)["w"]))
    assert it.position == 10  # the iterator state is the fallback's, never the damaged one's
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "step 2" in msg and "damaged" in msg, msg
    # moved aside, so the run can save step 2 again later
    assert ckpt.all_steps() == [1]
    assert len(os.listdir(os.path.join(workdir, DAMAGED_DIR))) == 1
    ckpt.save(2, _small_state(2.0), FakeIterator(20), {"model_type": "clip"}, {})
    ckpt.close()
    assert Checkpointer(workdir, every_steps=1).all_steps() == [1, 2]


def test_mismatched_model_is_an_error_not_damage(tmp_path):
    """A checkpoint of another model is reported (naming the tensor) and left in place."""
    from train.checkpoint import CheckpointMismatch

    workdir = str(tmp_path)
    ckpt = _two_checkpoints(workdir)
    other = _abstract(_small_state(1.0))
    other["w"] = jax.ShapeDtypeStruct((32, 64), jnp.float32, sharding=other["w"].sharding)
    with pytest.raises(CheckpointMismatch, match=r"w \(64, 64\) \(config wants \(32, 64\)\)"):
        ckpt.restore_latest(other, FakeIterator())
    assert ckpt.all_steps() == [1, 2] and not os.path.exists(os.path.join(workdir, DAMAGED_DIR))
    ckpt.close()


def test_partial_save_is_ignored(tmp_path):
    """A save killed mid-write leaves only a temporary folder: not listed, cleaned at start-up."""
    workdir = str(tmp_path)
    ckpt = _two_checkpoints(workdir)
    ckpt.close()
    tmp = os.path.join(workdir, "checkpoints", "3.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(tmp, "state"))
    ckpt = Checkpointer(workdir, every_steps=1)
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.restore_latest(_abstract(_small_state(1.0)), FakeIterator()).step == 2
    ckpt.close()


def test_fingerprint_is_sharding_independent():
    x = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8)
    a = jax.device_put(x, NamedSharding(_mesh(1, 1), PartitionSpec()))
    b = jax.device_put(x, NamedSharding(_mesh(4, 4), PartitionSpec("fsdp")))
    tree = {"x": a, "k": jax.random.key(3), "h": a.astype(jnp.bfloat16)}
    assert fingerprint(tree) == fingerprint({"x": b, "k": jax.random.key(3), "h": b.astype(jnp.bfloat16)})
    assert fingerprint(tree) != fingerprint({"x": a.at[5, 5].add(1.0), "k": jax.random.key(3),
                                             "h": a.astype(jnp.bfloat16)})
    # a permutation changes it too (elements are weighted by position)
    assert fingerprint({"x": a}) != fingerprint({"x": a[::-1]})


def test_metadata_has_export_keys():
    from metaclip_jax.models.registry import clip_model_config

    config = _tiny_config()
    meta = build_metadata(config, clip_model_config(config), model_type="clip")
    json.dumps(meta)
    assert meta["model_type"] == "clip" and meta["scanned_layers"] is True
    assert meta["model_config"]["vision"]["patch_size"] == 8
    assert meta["config"]["model"]["preset"] == "test-tiny"
    assert meta["code_version"]


def test_init_from_a_training_checkpoint(tmp_path):
    """``config.init_from``: params from another run's checkpoint, optimizer state and step fresh."""
    from metaclip_jax.models.registry import clip_model_config
    from train.loop import init_params_from
    from train.state import create_train_state

    config = _tiny_config()
    mesh = _mesh(1, 1)
    state, shardings = create_train_state(config, mesh)
    trained = state.replace(params=jax.tree.map(lambda x: x + 1.0, state.params), step=state.step + 9)
    ckpt = Checkpointer(str(tmp_path / "pretrain"), every_steps=1)
    ckpt.save(9, trained, FakeIterator(), build_metadata(config, clip_model_config(config)), {})
    ckpt.close()
    ft = _tiny_config(init_from=str(tmp_path / "pretrain"))
    out = init_params_from(ft, state, shardings)
    assert int(out.step) == 0
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(trained.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for leaf, sh in zip(jax.tree.leaves(out.params), jax.tree.leaves(shardings.params)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    other = _tiny_config(init_from=str(tmp_path / "pretrain"), **{"model.preset": "test-small",
                                                                  "data.image_size": 64})
    with pytest.raises(ValueError, match="model config differs"):
        init_params_from(other, state, shardings)
