"""Training measurements: timing counters, MFU, finiteness checks, and the metric writers.

* ``Chrono``: wall-clock accounting that survives preemption (train seconds, examples seen, data wait),
  saved in every checkpoint and restored with it (big_vision's ``Chrono``).
* ``model_flops_per_device`` / ``peak_flops_per_device``: the MFU estimate (spec metaclip.md §6.13): model
  FLOPs of one step per device (analytic, ``metaclip_jax.flops``) / wall step time / peak FLOP/s of a device.
* ``check_finite``: a non-finite loss (or any other watched metric) stops the run with a clear message.
* ``MetricWriter``: TensorBoard event files (tensorboardX) + ``metrics.jsonl`` (process 0 only) and a
  PNG of the training curves at the end (matplotlib Agg).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
# Metrics whose non-finite value stops the run (others, e.g. grad_norm alone, are checked too if present).
WATCHED = ("loss", "grad_norm", "logit_scale", "logit_bias", "param_norm")

# Dense bf16 peak FLOP/s per chip (vendor figures), keyed by a lower-case substring of ``device_kind``.
# Order matters: the first matching substring wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12),   # Trillium (v6e)
    ("v6e", 918e12),
    ("v5p", 459e12),
    ("v5 lite", 197e12),   # v5e
    ("v5e", 197e12),
    ("v5", 459e12),        # v5p reports "TPU v5"
    ("v4", 275e12),
    ("v3", 123e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
)


class NonFiniteError(FloatingPointError):
    """Raised when a watched training metric is NaN or infinite."""

    def __init__(self, step: int, name: str, value: float):
        self.step, self.name, self.value = step, name, value
        super().__init__(f"non-finite {name} = {value} at step {step}: stopping the run; the last good "
                         "checkpoint is left intact (the bad state is not saved)")


def check_finite(step: int, metrics: Mapping[str, Any], names: Iterable[str] = WATCHED) -> None:
    """Raise ``NonFiniteError`` naming the step and the first non-finite watched metric."""
    for name in names:
        if name in metrics:
            v = np.asarray(metrics[name], dtype=np.float64)
            if not np.all(np.isfinite(v)):
                raise NonFiniteError(step, name, float(v.reshape(-1)[0]) if v.size else float("nan"))


# ---------------------------------------------------------------------------------------------- FLOPs

def model_flops_per_device(config: Any) -> float:
    """Model FLOPs of one step per device (``metaclip_jax.flops``: XLA's cost analysis counts a scanned layer
    once, so it cannot be used for MFU). Llip's pair head is not included (an underestimate for Llip)."""
    import jax

    from metaclip_jax.flops import train_step_flops
    from metaclip_jax.models import registry

    arch = registry.get_model_type(config.model.type).model_config(config)
    total = train_step_flops(arch, int(config.data.global_batch_size), str(config.model.remat))
    return total / jax.device_count()


def peak_flops_per_device(configured: float | None = None, device: Any = None) -> float | None:
    """Peak FLOP/s of one device: the configured value if > 0, else a table lookup by ``device_kind``.

    Returns None where neither is known (e.g. CPU): MFU is then not reported.
    """
    if configured:
        return float(configured)
    if device is None:
        import jax

        device = jax.devices()[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak
    return None


# --------------------------------------------------------------------------------------------- timing

class Chrono:
    """Accumulates training time, examples seen and data-wait time; ``state()`` goes into checkpoints.

    Evaluation and checkpoint time are excluded from the rates (call ``pause()`` / ``resume()``).
    """

    def __init__(self, global_batch_size: int, num_devices: int, total_steps: int):
        self.global_batch_size = global_batch_size
        self.num_devices = num_devices
        self.total_steps = total_steps
        self.train_seconds = 0.0          # accumulated over all runs (restored from checkpoints)
        self.examples_seen = 0
        self.data_wait_seconds = 0.0
        self.first_step = 0               # step this process started at
        self._t0 = time.perf_counter()
        self._paused_at: float | None = None
        self._window: dict[str, float] = {"t": self._t0, "step": 0, "wait": 0.0, "train": 0.0}

    # checkpointed counters ------------------------------------------------------------------------
    def state(self) -> dict[str, float | int]:
        self._accumulate()
        return {"train_seconds": self.train_seconds, "examples_seen": int(self.examples_seen),
                "data_wait_seconds": self.data_wait_seconds}

    def load(self, state: Mapping[str, Any] | None, step: int) -> None:
        if state:
            self.train_seconds = float(state.get("train_seconds", 0.0))
            self.examples_seen = int(state.get("examples_seen", 0))
            self.data_wait_seconds = float(state.get("data_wait_seconds", 0.0))
        self.first_step = step
        self._t0 = time.perf_counter()
        self._window = {"t": self._t0, "step": step, "wait": self.data_wait_seconds,
                        "train": self.train_seconds}

    # accounting -----------------------------------------------------------------------------------
    def _accumulate(self) -> None:
        now = time.perf_counter()
        if self._paused_at is None:
            self.train_seconds += now - self._t0
        self._t0 = now

    def pause(self) -> None:
        self._accumulate()
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused_at = None
            self._t0 = time.perf_counter()

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait_seconds += seconds

    def add_step(self, examples: int) -> None:
        self.examples_seen += examples

    def window(self, step: int) -> dict[str, float]:
        """Rates since the previous call (the log interval); resets the window."""
        self._accumulate()
        w = self._window
        steps = max(step - w["step"], 0)
        secs = max(self.train_seconds - w["train"], 1e-9)
        wait = self.data_wait_seconds - w["wait"]
        self._window = {"t": time.perf_counter(), "step": step, "wait": self.data_wait_seconds,
                        "train": self.train_seconds}
        step_time = secs / steps if steps else float("nan")
        sps = steps * self.global_batch_size / secs if steps else float("nan")
        eta = step_time * (self.total_steps - step) if steps else float("nan")
        return {
            "perf/step_time_s": step_time,
            "perf/samples_per_s": sps,
            "perf/samples_per_s_per_device": sps / self.num_devices,
            "perf/data_wait_s": wait / steps if steps else float("nan"),
            "perf/data_wait_fraction": wait / secs if steps else float("nan"),
            "perf/train_hours": self.train_seconds / 3600,
            "perf/examples_seen": float(self.examples_seen),
            "perf/eta_s": eta,
        }


def mfu_metrics(flops_per_device: float | None, step_time: float, peak: float | None) -> dict[str, float]:
    """``perf/tflops_per_device`` and ``perf/mfu`` (where the peak is known)."""
    if not flops_per_device or not math.isfinite(step_time) or step_time <= 0:
        return {}
    achieved = flops_per_device / step_time
    out = {"perf/tflops_per_device": achieved / 1e12}
    if peak:
        out["perf/mfu"] = achieved / peak
    return out


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_line(step: int, total: int, m: Mapping[str, Any]) -> str:
    """One human-readable progress line."""
    parts = [f"step {step:>7d}/{total}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("logit_scale", "scale {:.2f}"),
                     ("logit_bias", "bias {:.2f}"),
                     ("grad_norm", "gnorm {:.3f}"), ("perf/samples_per_s", "{:.1f} samples/s"),
                     ("perf/mfu", "mfu {:.1%}"), ("perf/data_wait_fraction", "data-wait {:.0%}")):
        v = m.get(key)
        if v is not None and (not isinstance(v, float) or math.isfinite(v)):
            parts.append(fmt.format(v))
    parts.append(f"eta {format_eta(m.get('perf/eta_s', float('nan')))}")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------- writers

def _scalar(v: Any) -> float | None:
    try:
        a = np.asarray(v)
    except Exception:
        return None
    if a.size != 1 or a.dtype.kind not in "biuf":
        return None
    return float(a.reshape(()))


class MetricWriter:
    """TensorBoard events + ``metrics.jsonl`` in the workdir; a no-op except on process 0.

    On resume, ``metrics.jsonl`` rows after the restored step are dropped first (they came from the
    interrupted run past its last checkpoint), so the file reads as one clean history.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
        self.workdir = workdir
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        _truncate_jsonl(path, resume_step)
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        try:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard hides the interrupted run's events after the restored step
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None)
        except Exception as e:  # tensorboardX missing or unwritable: keep the JSONL
            log.warning("TensorBoard writer unavailable (%s); writing metrics.jsonl only", e)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            x = _scalar(v)
            if x is None:
                continue
            row[k] = x if math.isfinite(x) else str(x)
            if self._tb is not None and math.isfinite(x):
                self._tb.add_scalar(k, x, int(step))
        self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
        self._jsonl.flush()

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _truncate_jsonl(path: str, resume_step: int) -> None:
    """Keep only rows with ``step <= resume_step`` (atomic rewrite)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if int(row.get("step", 0)) <= resume_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


PLOT_PANELS = (("loss", "loss"), ("lr", "learning rate"), ("logit_scale", "logit scale"),
               ("grad_norm", "grad norm"), ("perf/samples_per_s", "samples/s"), ("perf/mfu", "MFU"))


def plot_curves(workdir: str, out: str | None = None) -> str | None:
    """PNG of the training curves from ``metrics.jsonl`` (matplotlib Agg); returns its path."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    rows = read_jsonl(path)
    panels = [(k, t) for k, t in PLOT_PANELS if any(isinstance(r.get(k), float | int) for r in rows)]
    evals = sorted({k for r in rows for k in r if k.startswith("eval/")})[:3]
    panels += [(k, k) for k in evals]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float | int)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = out or os.path.join(workdir, PLOT_FILE)
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)
    return out
