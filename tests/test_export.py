"""checkpoint_io + ``python -m metaclip_jax.export``: params / open_clip formats, imports, mismatches."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from metaclip_jax import checkpoint_io as cio
from metaclip_jax import export as ex
from metaclip_jax import open_clip_interop as oc
from metaclip_jax.models import presets
from tests.reference import import_open_clip

QG_CFG = presets.get_config("test-tiny").replace(activation="quick_gelu")


def _flat(params):
    return cio.flatten_params(params)


def _assert_bitwise(a, b):
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def random_params(model_type: str, cfg, seed: int = 0) -> dict:
    """Random float32 params of the model's structure, drawn on the host (no eager init: fast)."""
    rng = np.random.default_rng(seed)
    return cio.unflatten_params({k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
                                 for k, v in _flat(cio.abstract_params(model_type, cfg)).items()})


@pytest.fixture(scope="module")
def random_loaded() -> cio.LoadedModel:
    return cio.LoadedModel("clip", QG_CFG, random_params("clip", QG_CFG, 3), "random")


@pytest.fixture(scope="module")
def open_clip_sd():
    """A perturbed random open_clip test-tiny (QuickGELU) state dict and the torch model."""
    open_clip, torch = import_open_clip()
    torch.manual_seed(0)
    ref = open_clip.CLIP(**oc.open_clip_model_config(QG_CFG)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return {k: v.detach().clone() for k, v in ref.state_dict().items()}, ref


def _save_pt(torch, sd, path):
    """MetaCLIP's released layout: {"state_dict": {"module.<name>": tensor}}."""
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 32}, str(path))


def _inputs(n=3, seed=0):
    rng = np.random.default_rng(seed)
    s = QG_CFG.vision.image_size
    images = rng.standard_normal((n, s, s, 3)).astype(np.float32)
    tokens = np.zeros((n, 77), np.int64)
    for i in range(n):
        length = int(rng.integers(3, 20))
        tokens[i, 0], tokens[i, length] = 49406, 49407
        tokens[i, 1:length] = rng.integers(1, 49406, length - 1)
    return images, tokens


@pytest.mark.reference
def test_import_pt_then_open_clip_export_round_trip(tmp_path, open_clip_sd):
    open_clip, torch = import_open_clip()
    sd, ref = open_clip_sd
    pt = tmp_path / "test-tiny-quickgelu.pt"     # the name says QuickGELU
    _save_pt(torch, sd, pt)

    # Import: .pt ({"state_dict"} + "module.") -> params-only checkpoint.
    assert ex.main(["--checkpoint", str(pt), "--format", "params", "--output", str(tmp_path / "p")]) == 0
    loaded = cio.load_params(tmp_path / "p")
    assert loaded.model_type == "clip" and loaded.config.activation == "quick_gelu"
    assert loaded.config.vision == QG_CFG.vision and loaded.config.text == QG_CFG.text
    meta = json.loads((tmp_path / "p" / "model_config.json").read_text())
    assert meta["scanned_layers"] is True and meta["activation"] == "quick_gelu"
    _assert_bitwise(loaded.params, oc.params_from_open_clip({k: v.numpy() for k, v in sd.items()}, QG_CFG))

    # ours -> open_clip: loads strict in open_clip, identical tensors, embeddings within 1e-4.
    out = tmp_path / "oc"
    assert ex.main(["--checkpoint", str(tmp_path / "p"), "--format", "open_clip", "--output", str(out)]) == 0
    cfg_json = json.loads((out / "open_clip_config.json").read_text())
    assert cfg_json["model_cfg"]["quick_gelu"] is True and "preprocess_cfg" in cfg_json
    from safetensors.torch import load_file

    exported = load_file(str(out / "open_clip_model.safetensors"))
    fresh = open_clip.CLIP(**cfg_json["model_cfg"]).eval()
    fresh.load_state_dict(exported, strict=True)
    for k, v in sd.items():
        if k != "attn_mask":
            assert torch.equal(exported[k], v.float()), k
    created = open_clip.create_model("local-dir:" + str(out)).eval()   # open_clip's own loader
    assert all(torch.equal(created.state_dict()[k], v) for k, v in exported.items())

    images, tokens = _inputs()
    ours = cio.build_model(loaded)
    with torch.no_grad():
        r_img = created.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
        r_txt = created.encode_text(torch.from_numpy(tokens)).numpy()
    assert np.abs(np.asarray(ours.encode_image(jnp.asarray(images))) - r_img).max() <= 1e-4
    assert np.abs(np.asarray(ours.encode_text(jnp.asarray(tokens, jnp.int32))) - r_txt).max() <= 1e-4

    # open_clip -> ours again: bitwise equal params (folder form and bare safetensors file + flag).
    _assert_bitwise(cio.load_params(out).params, loaded.params)
    again = cio.load_params(out / "open_clip_model.safetensors", quick_gelu=True)
    _assert_bitwise(again.params, loaded.params)


def test_params_export_f32_exact_and_bf16_rounding(tmp_path, random_loaded):
    p32 = cio.save_params(tmp_path / "f32", random_loaded, "float32")
    for src in (p32, p32 / "model.safetensors"):            # Orbax tree and safetensors
        back = cio.load_params(src)
        assert back.config == random_loaded.config
        _assert_bitwise(back.params, random_loaded.params)
    with pytest.raises(FileExistsError):
        cio.save_params(tmp_path / "f32", random_loaded)

    assert ex.main(["--checkpoint", str(p32), "--format", "params", "--dtype", "bfloat16",
                    "--output", str(tmp_path / "bf16")]) == 0
    bf = cio.load_params(tmp_path / "bf16")
    st = cio.load_params(tmp_path / "bf16" / "model.safetensors")
    src = _flat(random_loaded.params)
    for k, v in _flat(bf.params).items():
        assert v.dtype == ml_dtypes.bfloat16, k
        np.testing.assert_array_equal(v, src[k].astype(ml_dtypes.bfloat16), err_msg=k)
        np.testing.assert_array_equal(_flat(st.params)[k], v, err_msg=k)
        np.testing.assert_allclose(v.astype(np.float32), src[k], rtol=2**-8, atol=0, err_msg=k)
    # A bf16 checkpoint still builds a float32 model.
    model = cio.build_model(bf)
    assert model.visual.proj[...].dtype == jnp.float32


def test_training_workdir_restores_params_only(tmp_path, random_loaded):
    import optax

    params = nnx.state(cio.build_model(random_loaded), nnx.Param)   # nnx.State, as the trainer holds it
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = {"step": jnp.int32(7), "params": params, "opt_state": (optax.ScaleByAdamState(
        count=jnp.int32(7), mu=zeros, nu=zeros), optax.EmptyState()), "rng": jnp.zeros((2,), jnp.uint32)}
    workdir = tmp_path / "run"
    try:
        from train.checkpoint import Checkpointer, build_metadata
    except ImportError:  # pragma: no cover - the training package is optional here
        pytest.skip("train.checkpoint not importable")

    class _Iter:
        def get_state(self):
            return {"position": 0}

    ck = Checkpointer(str(workdir), every_steps=1, async_save=False)
    for step in (3, 7):
        ck.save(step, state, _Iter(), build_metadata({"seed": 0}, random_loaded.config), {})
    ck.close()
    (workdir / "checkpoints" / "9.orbax-checkpoint-tmp-1").mkdir()   # an unfinished save: ignored
    for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "7"):
        loaded = cio.load_params(path)
        assert loaded.model_type == "clip" and loaded.config == random_loaded.config
        assert "/7/" in loaded.source
        _assert_bitwise(loaded.params, random_loaded.params)
    assert cio.load_params(workdir / "checkpoints" / "3").source.count("/3/") == 1


def test_mismatches_and_activation_are_loud(tmp_path, random_loaded, capsys):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(np.array(v)) for k, v in
          oc.params_to_open_clip(random_loaded.params, QG_CFG).items()}

    anon = tmp_path / "weights.pt"
    _save_pt(torch, sd, anon)
    with pytest.raises(ValueError, match="--quickgelu"):
        cio.load_params(anon)
    assert ex.main(["--checkpoint", str(anon), "--format", "params", "--output", str(tmp_path / "x")]) == 2
    assert "--no-quickgelu" in capsys.readouterr().err
    _assert_bitwise(cio.load_params(anon, quick_gelu=True).params, random_loaded.params)

    with pytest.raises(oc.CheckpointMismatch, match="ln_final"):       # wrong shape, tensor named
        bad = dict(sd, **{"ln_final.weight": torch.ones(65)})
        _save_pt(torch, bad, tmp_path / "bad_shape_quickgelu.pt")
        cio.load_params(tmp_path / "bad_shape_quickgelu.pt")
    with pytest.raises(oc.CheckpointMismatch, match="transformer.resblocks.1.mlp.c_fc.bias"):  # missing
        _save_pt(torch, {k: v for k, v in sd.items() if k != "transformer.resblocks.1.mlp.c_fc.bias"},
                 tmp_path / "missing_quickgelu.pt")
        cio.load_params(tmp_path / "missing_quickgelu.pt")
    with pytest.raises(oc.CheckpointMismatch):                          # wrong preset for the weights
        cio.load_params(anon, model="ViT-B-32-quickgelu")
    with pytest.raises(ValueError, match="contradicts"):               # GELU preset, QuickGELU file name
        cio.resolve_quick_gelu("b32_400m.pt", "ViT-B-32", None)
    assert cio.resolve_quick_gelu("b32_400m.pt", None, None) is True
    assert cio.resolve_quick_gelu("h14_v1.2_altogether.pt", None, None) is False

    # Our checkpoints: a tampered tensor shape or a contradicting flag is an error too.
    p = cio.save_params(tmp_path / "ours", random_loaded)
    with pytest.raises(ValueError, match="contradicts"):
        cio.load_params(p, quick_gelu=False)
    meta = json.loads((p / "model_config.json").read_text())
    meta["model_config"]["embed_dim"] = 16
    (p / "model_config.json").write_text(json.dumps(meta))
    with pytest.raises(oc.CheckpointMismatch, match="proj"):
        cio.load_params(p)


def test_llip_params_and_refused_open_clip(tmp_path):
    llip = pytest.importorskip("metaclip_jax.models.llip")
    cfg = llip.get_llip_config("llip-test-tiny")
    loaded = cio.LoadedModel("llip", cfg, random_params("llip", cfg), "random")
    back = cio.load_params(cio.save_params(tmp_path / "llip", loaded))
    assert back.model_type == "llip" and back.config == cfg
    _assert_bitwise(back.params, loaded.params)
    with pytest.raises(ValueError, match="open_clip has no 'llip' model"):
        ex.export_open_clip(back, tmp_path / "oc")
