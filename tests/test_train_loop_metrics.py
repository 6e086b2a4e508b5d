"""train/metrics.py and the loop's small pieces (fast, in-process): writers, timing, MFU, CLI, eval hook."""

from __future__ import annotations

import json
import math
import sys
import types

import jax
import numpy as np
import pytest

from train import metrics as m


def test_check_finite_names_step_and_metric():
    m.check_finite(3, {"loss": np.float32(1.0), "grad_norm": 2.0})
    with pytest.raises(m.NonFiniteError, match=r"non-finite loss = nan at step 7"):
        m.check_finite(7, {"loss": np.float32(np.nan), "lr": 1e-3})
    with pytest.raises(m.NonFiniteError, match=r"grad_norm = inf at step 2"):
        m.check_finite(2, {"loss": 1.0, "grad_norm": np.inf})


def test_chrono_survives_restore_and_excludes_pauses():
    c = m.Chrono(global_batch_size=8, num_devices=2, total_steps=10)
    c.load(None, 0)
    for _ in range(4):
        c.add_step(8)
        c.add_data_wait(0.01)
    c.pause()
    saved = c.state()
    assert saved["examples_seen"] == 32 and saved["data_wait_seconds"] == pytest.approx(0.04)
    c2 = m.Chrono(8, 2, 10)
    c2.load(saved, 4)
    assert c2.examples_seen == 32 and c2.train_seconds == pytest.approx(saved["train_seconds"])
    c2.add_step(8)
    w = c2.window(5)
    assert w["perf/samples_per_s"] > 0 and w["perf/samples_per_s_per_device"] == pytest.approx(
        w["perf/samples_per_s"] / 2)
    assert w["perf/examples_seen"] == 40 and math.isfinite(w["perf/eta_s"])


def test_mfu_from_model_flops():
    from metaclip_jax.config_schema import default_config
    from metaclip_jax.flops import train_step_flops
    from metaclip_jax.models import presets

    config = default_config()
    config.model.preset = "ViT-B-32"
    config.data.global_batch_size = 64
    flops = m.model_flops_per_device(config)
    assert flops == pytest.approx(train_step_flops(presets.get_config("ViT-B-32"), 64) / jax.device_count())
    out = m.mfu_metrics(flops, step_time=0.5, peak=m.peak_flops_per_device(1e9))
    assert out["perf/mfu"] == pytest.approx(flops / 0.5 / 1e9)
    assert m.peak_flops_per_device(None, types.SimpleNamespace(device_kind="TPU v5 lite")) == 197e12
    assert m.peak_flops_per_device(None, types.SimpleNamespace(device_kind="cpu")) is None


def test_writer_jsonl_tensorboard_resume_and_plot(tmp_path):
    w = m.MetricWriter(str(tmp_path))
    for s in range(1, 7):
        w.write(s, {"loss": 3.0 / s, "lr": np.float32(1e-3), "perf/samples_per_s": 100.0 + s, "text": "x"})
    w.close()
    rows = m.read_jsonl(str(tmp_path / m.METRICS_FILE))
    assert [r["step"] for r in rows] == list(range(1, 7)) and "text" not in rows[0]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # resumed from step 4: rows 5, 6 of the interrupted run are dropped, then rewritten
    with open(tmp_path / m.METRICS_FILE, "a") as f:
        f.write('{"step": 7, "loss": ')  # a line torn by a kill
    w = m.MetricWriter(str(tmp_path), resume_step=4)
    w.write(5, {"loss": 0.5})
    w.close()
    rows = m.read_jsonl(str(tmp_path / m.METRICS_FILE))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss"] == 0.5
    png = m.plot_curves(str(tmp_path))
    assert png and (tmp_path / m.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not m.MetricWriter(str(tmp_path / "other"), enabled=False).enabled


def test_console_line():
    line = m.console_line(50, 100, {"loss": 1.25, "lr": 1e-3, "perf/samples_per_s": 123.4,
                                    "perf/eta_s": 3725.0, "perf/mfu": float("nan")})
    assert "step      50/100" in line and "loss 1.2500" in line and "123.4 samples/s" in line
    assert "eta 1h02m" in line and "mfu" not in line


def test_cli_arguments():
    from train.__main__ import parse_args

    args, over = parse_args(["--config", "configs/tiny.py:siglip", "--workdir", "w",
                             "--config.total_steps=5", "--config.optimizer.lr", "0.1"])
    assert args.config == "configs/tiny.py:siglip" and args.workdir == "w"
    assert over == ["--config.total_steps=5", "--config.optimizer.lr=0.1"]
    with pytest.raises(SystemExit):
        parse_args(["--config", "c.py", "--bogus=1"])


def test_cli_rejects_bad_config(capsys):
    from train.__main__ import main

    assert main(["--config", "configs/tiny.py", "--workdir", "/nonexistent", "--config.total_stepz=3"]) == 2
    assert "total_stepz" in capsys.readouterr().err


def _config(**over):
    from metaclip_jax.config_schema import load_config
    from train import loop  # noqa: F401  (registers the loop's config fields)

    return load_config("configs/tiny.py", [f"--config.{k}={v}" for k, v in over.items()])


def test_loop_knobs_are_in_the_schema():
    c = _config(debug_nan_at_step=3, peak_flops_per_device=1e12)
    assert c.debug_nan_at_step == 3 and c.peak_flops_per_device == 1e12


def test_eval_hook_no_op_and_registry(monkeypatch):
    from train.loop import EvalHook

    assert EvalHook.build(_config(), mesh=None) is None

    calls = []

    class FakeEval:
        name, every_steps = "fake", 4

        def should_run(self, step, last_step=False):
            return last_step or step % self.every_steps == 0

    def build_evaluators(config, mesh=None, *, graphdef=None, defaults=None):
        calls.append((config, defaults, graphdef is not None))
        return [FakeEval()]

    def run_evaluators(evs, params, step, last_step=False):
        return {"fake/top1": 50.0}

    fake = types.SimpleNamespace(build_evaluators=build_evaluators, run_evaluators=run_evaluators)
    import evaluate

    monkeypatch.setitem(sys.modules, "evaluate.registry", fake)
    monkeypatch.setattr(evaluate, "registry", fake, raising=False)
    hook = EvalHook.build(_config(**{"eval.evaluators": "[{'name': 'fake', 'dataset': 'x'}]",
                                     "eval.every_steps": 4}), mesh=None)
    assert hook is not None and calls[0][0] == {"eval": [{"name": "fake", "dataset": "x"}]}
    assert calls[0][1] == {"every_steps": 4} and calls[0][2]
    assert hook.due(8, False) and not hook.due(6, False) and hook.due(6, True)
    assert hook(8, {}, False) == {"eval/fake/top1": 50.0}
    json.dumps(hook(8, {}, False))
