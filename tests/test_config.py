"""Config loading, overrides, validation errors and duration conversion."""

import math

import pytest

from metaclip_jax.config_schema import (
    ConfigError,
    apply_overrides,
    config_from_file,
    load_config,
    mesh_shape,
    resolve_durations,
    train_data_config,
    validate,
)
from metaclip_jax.models import presets

METACLIP_VARIANTS = ["b32_400m", "b16_400m", "l14_400m", "b32_fullcc", "b16_fullcc", "l14_fullcc",
                     "h14_fullcc", "G14_fullcc"]


@pytest.mark.parametrize("variant", METACLIP_VARIANTS)
def test_metaclip_recipes_match_spec(variant):
    c = load_config(f"configs/metaclip.py:{variant}")
    assert c.total_steps == 390_624 and c.total_epochs is None and c.total_examples is None
    assert c.data.global_batch_size == 32_768
    o = c.optimizer
    got = (o.b1, o.b2, o.eps, o.weight_decay, o.warmup_steps, o.grad_clip)
    assert got == (0.9, 0.98, 1e-6, 0.2, 2000, None)
    big = not variant.startswith(("b32", "b16"))
    assert o.lr == (4e-4 if big else 5e-4)
    assert c.model.preset.endswith("-quickgelu") and c.model.dtype == "bfloat16"
    assert c.model.remat == ("none" if variant.startswith("b32") else "full")
    assert presets.get_config(c.model.preset).activation == "quick_gelu"
    mesh_shape(c, 256)  # 32,768 splits over 256 chips


def test_siglip_and_tiny_configs():
    c = load_config("configs/siglip.py:b16_400m")
    assert c.loss.name == "siglip" and c.model.init_logit_bias == -10.0
    assert c.model.init_logit_scale == pytest.approx(math.log(10))
    for v in ("", ":siglip", ":accum"):
        t = load_config("configs/tiny.py" + v)
        assert t.model.preset == "test-tiny" and t.total_steps > 0
    d = train_data_config(load_config("configs/tiny.py"))
    from input_pipeline import TrainDataConfig

    TrainDataConfig.from_mapping(d).validate()  # every data key is the pipeline's


def test_overrides_parse_with_field_types():
    c = load_config("configs/tiny.py", ["--config.optimizer.lr=3e-4", "--config.total_steps=7",
                                        "--config.model.dtype=bfloat16", "--config.optimizer.grad_clip=1",
                                        "--config.data.paths=['a','b']", "config.checkpoint.async_save=true",
                                        "--config.loss.chunk_size=None",
                                        "--config.mesh.rules={'mlp': 'fsdp'}"])
    assert c.optimizer.lr == 3e-4 and c.total_steps == 7 and c.model.dtype == "bfloat16"
    assert c.optimizer.grad_clip == 1.0 and isinstance(c.optimizer.grad_clip, float)
    assert list(c.data.paths) == ["a", "b"] and c.checkpoint.async_save is True and c.loss.chunk_size is None
    assert c.mesh.rules["mlp"] == "fsdp"


@pytest.mark.parametrize("override,match", [
    ("--config.optimizer.weight_decy=1", r"optimizer.weight_decy.*did you mean 'weight_decay'"),
    ("--config.optimizer.lr=fast", "cannot read 'fast' as a float"),
    ("--config.optimiser.lr=1", r"optimiser.*did you mean 'optimizer'"),
    ("--config.total_steps=abc", "as an int"),
    ("--config.model.remat=partial", r"model.remat must be one of"),
    ("--config.model.dtype=bf16", r"model.dtype must be one of"),
    ("--config.optimizer.warmup_steps=1000", r"warmup_steps 1000 is longer than the run"),
    ("--config.optimizer.grad_accum_steps=3", r"batch_size 16 is not divisible by optimizer.grad_accum"),
    ("--config.loss.chunk_size=5", r"loss.chunk_size 5 does not divide"),
    ("--config.model.preset=ViT-B-32-quickgelo", r"type .clip.; did you mean .ViT-B-32-quickgelu."),
    ("--config.loss.name=siglip", r"needs model.init_logit_bias"),
    ("--config.data.image_size=64", r"data.image_size 64 != model.preset"),
    ("--config.mesh.rules={'embedd': 'fsdp'}", r"mesh.rules: unknown logical axis 'embedd'"),
    ("--config.optimizer.b2=1.5", r"optimizer.b2 must be in \[0, 1\)"),
    ("noequals", "not of the form"),
])
def test_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/tiny.py", [override])


def test_unknown_key_in_file_and_wrong_type():
    c = config_from_file("configs/tiny.py")
    with c.unlocked():
        c.optimizer.weight_decy = 0.1
    with pytest.raises(ConfigError, match="did you mean 'weight_decay'"):
        validate(c)
    c = config_from_file("configs/tiny.py")
    c.loss.chunk_size = "big"   # None-valued fields take any type in a ConfigDict; the schema does not
    with pytest.raises(ConfigError, match="loss.chunk_size must be int"):
        validate(c)


def test_durations_converted_once():
    base = config_from_file("configs/tiny.py")   # global batch 16
    for setting, steps in [({"total_steps": 40}, 40), ({"total_examples": 1000}, 62),
                           ({"total_epochs": 2.5, "num_examples": 160}, 25)]:
        c = config_from_file("configs/tiny.py")
        c.total_steps = None
        for k, v in setting.items():
            if k == "num_examples":
                c.data.num_examples = v
            else:
                c[k] = v
        validate(c)
        r = resolve_durations(c)
        assert r.total_steps == steps and r.total_examples is None and r.total_epochs is None
        assert resolve_durations(r).total_steps == steps
    c = config_from_file("configs/tiny.py")
    c.total_examples = 100
    with pytest.raises(ConfigError, match="exactly one of"):
        validate(c)
    c = config_from_file("configs/tiny.py")
    c.total_steps = None
    c.total_epochs = 1
    with pytest.raises(ConfigError, match="needs data.num_examples"):
        validate(c)
    assert base.total_steps == 40


def test_mesh_shape_errors():
    c = load_config("configs/tiny.py")
    assert mesh_shape(c, 8) == (8, 1, 1)
    apply_overrides(c, ["--config.mesh.data=2", "--config.mesh.fsdp=2"])
    with pytest.raises(ConfigError, match="needs|but 8 are available"):
        mesh_shape(c, 8)
    apply_overrides(c, ["--config.data.global_batch_size=12", "--config.mesh.fsdp=4"])
    with pytest.raises(ConfigError, match="not divisible by the batch devices"):
        mesh_shape(c, 8)


def test_data_schema_defaults_equal_the_input_pipeline_defaults():
    """The train config's ``data`` section mirrors ``TrainDataConfig``: same fields, same defaults, so the
    pipeline's benchmarked defaults are what training runs with."""
    import dataclasses

    from input_pipeline import TrainDataConfig
    from metaclip_jax.config_schema import SCHEMA

    schema = {k: f for k, f in SCHEMA["data"].items() if k not in ("num_examples", "synthetic_examples")}
    fields = {f.name: f.default for f in dataclasses.fields(TrainDataConfig)}
    assert set(schema) == set(fields)
    for name, default in fields.items():
        if name in ("paths", "image_size"):  # the schema leaves these to the experiment / model preset
            continue
        want = tuple(default) if isinstance(default, list) else default
        assert schema[name].default == want, name
