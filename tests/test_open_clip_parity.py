"""Our Flax CLIP equals open_clip (CPU torch) after converting weights, in both directions."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metaclip_jax import open_clip_interop as oc
from metaclip_jax.models import presets
from metaclip_jax.models.clip import CLIP
from tests.reference import import_open_clip

pytestmark = pytest.mark.reference


def _perturbed_open_clip(open_clip, torch, model_cfg: dict):
    """open_clip model with random weights; every tensor perturbed so zero biases / unit LN scales
    also exercise the mapping."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _inputs(torch, cfg, n=3, seed=0):
    rng = np.random.default_rng(seed)
    s = cfg.vision.image_size
    images = rng.standard_normal((n, 3, s, s)).astype(np.float32)
    tokens = np.zeros((n, cfg.text.context_length), np.int64)
    for i in range(n):
        length = int(rng.integers(2, cfg.text.context_length - 1))
        tokens[i, 0] = 49406
        tokens[i, 1:length] = rng.integers(1, 49406, length - 1)
        tokens[i, length] = 49407
    return images, tokens


@pytest.mark.parametrize("name", ["test-small", "ViT-B-32-quickgelu"])
def test_open_clip_to_ours_and_back(name):
    open_clip, torch = import_open_clip()
    cfg = presets.get_config(name)
    ref = _perturbed_open_clip(open_clip, torch, oc.open_clip_model_config(cfg))
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}

    model = CLIP(cfg, rngs=nnx.Rngs(1))
    oc.check_and_assign(model, oc.params_from_open_clip(sd, cfg))

    images, tokens = _inputs(torch, cfg)
    with torch.no_grad():
        r_img, r_txt, r_scale = ref(torch.from_numpy(images), torch.from_numpy(tokens))
        r_logits = (r_scale * r_img @ r_txt.T).numpy()
    img, txt, scale = model(jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(tokens, jnp.int32))
    logits = np.asarray(scale * img @ txt.T)
    assert np.abs(np.asarray(img) - r_img.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(txt) - r_txt.numpy()).max() <= 1e-4
    assert np.abs(logits - r_logits).max() <= 1e-4 * max(1.0, float(r_scale))
    # Unnormalised encoders too.
    with torch.no_grad():
        r_raw = ref.encode_image(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(np.asarray(model.encode_image(jnp.asarray(images.transpose(0, 2, 3, 1)))),
                               r_raw, atol=1e-4, rtol=1e-4)

    # Back to open_clip: identical tensors, loadable with strict=True.
    back = oc.params_to_open_clip(oc.model_params_dict(model), cfg)
    assert set(back) == set(sd) - {"attn_mask"}
    for k in back:
        np.testing.assert_array_equal(back[k], sd[k].astype(np.float32), err_msg=k)
    fresh = open_clip.CLIP(**oc.open_clip_model_config(cfg))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_preset_matches_open_clip_named_config():
    open_clip, torch = import_open_clip()
    for name in ["ViT-B-32-quickgelu", "ViT-L-14", "ViT-bigG-14", "ViT-H-14-worldwide"]:
        cfg = presets.get_config(name)
        ref = open_clip.get_model_config(name)
        ours = oc.open_clip_model_config(cfg)
        assert ours["embed_dim"] == ref["embed_dim"]
        assert ours["quick_gelu"] == ref.get("quick_gelu", False)
        for k in ("layers", "width", "patch_size", "image_size"):
            assert ours["vision_cfg"][k] == ref["vision_cfg"][k], (name, k)
        for k in ("width", "heads", "layers", "vocab_size", "context_length"):
            assert ours["text_cfg"][k] == ref["text_cfg"][k], (name, k)


@pytest.mark.parametrize("name", ["ViT-S-32", "ViT-M-16", "ViT-B-32-quickgelu"])
def test_param_count_equals_open_clip_model(name):
    open_clip, torch = import_open_clip()
    ref = open_clip.create_model(name)
    assert presets.param_count(name) == sum(p.numel() for p in ref.parameters())


def test_state_dict_file_roundtrip_and_mismatch(tmp_path):
    open_clip, torch = import_open_clip()
    cfg = presets.get_config("test-tiny", activation="quick_gelu")
    ref = _perturbed_open_clip(open_clip, torch, oc.open_clip_model_config(cfg))
    # MetaCLIP release layout: {"state_dict": ...} with a DDP "module." prefix, read with weights_only.
    path = tmp_path / "b32_400m.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    sd = oc.load_state_dict(path)
    assert not any(k.startswith("module.") for k in sd)
    inferred = oc.infer_config(sd, quick_gelu=bool(oc.quick_gelu_from_name(path.name)))
    assert inferred.vision == cfg.vision and inferred.text == cfg.text
    assert inferred.activation == "quick_gelu"
    model = CLIP(inferred, rngs=nnx.Rngs(0))
    oc.check_and_assign(model, oc.params_from_open_clip(sd, inferred))
    # safetensors: same tensors without torch.
    from safetensors.numpy import save_file
    st = tmp_path / "m.safetensors"
    save_file(oc.params_to_open_clip(oc.model_params_dict(model), inferred), str(st))
    sd2 = oc.load_state_dict(st)
    for k in sd2:
        np.testing.assert_array_equal(sd2[k], sd[k])
    # A wrong architecture is a loud error naming the tensor.
    wrong = presets.get_config("test-small")
    with pytest.raises(oc.CheckpointMismatch, match="lacks|shape"):
        oc.check_and_assign(CLIP(wrong, rngs=nnx.Rngs(0)), oc.params_from_open_clip(sd, wrong))


def test_quick_gelu_names():
    assert oc.quick_gelu_from_name("b32_400m.pt") is True
    assert oc.quick_gelu_from_name("G14_fullcc2.5b.pt") is True
    assert oc.quick_gelu_from_name("ViT-H-14-quickgelu") is True
    assert oc.quick_gelu_from_name("h14_v1.2_altogether.pt") is False
    assert oc.quick_gelu_from_name("model.safetensors") is None
