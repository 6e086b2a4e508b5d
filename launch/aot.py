"""Ahead-of-time compile of the real train step for a TPU topology that is not attached.

    python -m launch.aot --config configs/metaclip.py:b32_400m --topology v5p:4x4x8 [--config.key=value ...]

Needs libtpu (``pip install -r requirements-tpu.txt``; on a CPU-only machine a copy of the ``libtpu`` package
in ``.venv-tpu/`` is also found). The topology is ``<generation>:<chips shape>``, generation one of v4, v5e
(alias v5litepod), v5p, v6e (alias trillium), e.g. ``v4:2x2x2``, ``v5e:4x4``, ``v5p:4x4x8``, ``v6e:8x8``.

Prints, per chip: the compiled memory (arguments + outputs + temporaries - donated aliases) against the chip's
HBM, the step's FLOPs from XLA's cost analysis, and a roofline step time ``max(flops / peak bf16 FLOP/s,
bytes / HBM bandwidth)``. A mesh that does not fit the chip count is a ConfigError before anything is
compiled. Exit status: 0 fits, 2 does not fit in HBM, 1 error. ``--json PATH`` writes the numbers.

The config is validated (and durations resolved) exactly as ``python -m train`` does; the data section is not
read (batches are ``ShapeDtypeStruct`` s).
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _find_libtpu() -> str | None:
    """Make ``import libtpu`` work: installed, or the CPU-side copy in ``.venv-tpu/`` (put it first on
    sys.path before jax discovers its plugins)."""
    try:
        import libtpu

        return os.path.dirname(libtpu.__file__)
    except ImportError:
        pass
    local = os.path.join(_ROOT, ".venv-tpu")
    if os.path.isdir(os.path.join(local, "libtpu")):
        sys.path.insert(0, local)
        return os.path.join(local, "libtpu")
    return None


_LIBTPU = _find_libtpu()
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata lookups (minutes of timeouts off-cloud)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: no /tmp/libtpu_lockfile exclusivity

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_bf16_flops: float     # per chip
    hbm_bandwidth: float       # bytes/s per chip
    chip_config: str           # libtpu chip_config_name ("megacore": one device per chip on v4 / v5p)


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1.2e12, "megacore"),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 0.819e12, "default"),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2.765e12, "megacore"),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1.64e12, "default"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e", "v6": "v6e", "v5": "v5p"}


class TopologyError(ValueError):
    pass


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """``"v5p:4x4x8"`` -> ("v5p", (4, 4, 8)); aliases v5litepod -> v5e, trillium -> v6e."""
    m = re.fullmatch(r"([a-zA-Z0-9]+)[:=_]([0-9]+(?:x[0-9]+)*)", name.strip())
    if not m:
        raise TopologyError(f"topology {name!r}: expected <generation>:<shape>, e.g. v5p:4x4x8, v5e:4x4 "
                            f"(generations: {', '.join(CHIPS)})")
    gen = ALIASES.get(m.group(1).lower(), m.group(1).lower())
    if gen not in CHIPS:
        raise TopologyError(f"topology {name!r}: unknown generation {m.group(1)!r}; known: "
                            f"{', '.join(CHIPS)} (aliases {', '.join(ALIASES)})")
    dims = tuple(int(x) for x in m.group(2).split("x"))
    want = 3 if gen in ("v4", "v5p") else 2
    if len(dims) != want:
        raise TopologyError(f"topology {name!r}: {gen} shapes have {want} dimensions (e.g. "
                            f"{'4x4x4' if want == 3 else '4x4'})")
    return gen, dims


def topology_devices(gen: str, dims: tuple[int, ...]) -> list[Any]:
    if _LIBTPU is None:
        raise TopologyError("libtpu is not installed: pip install -r requirements-tpu.txt (or put the libtpu "
                            "package in .venv-tpu/)")
    from jax.experimental import topologies

    name = f"{gen}:{'x'.join(map(str, dims))}"
    host = (2, 2, 1)
    return list(topologies.get_topology_desc(
        platform="tpu", topology_name=name, chip_config_name=CHIPS[gen].chip_config,
        chips_per_host_bounds=host, num_slices=1).devices)


def _mesh(config: Any, devices: list[Any]) -> Any:
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from metaclip_jax import config_schema, sharding

    shape = config_schema.mesh_shape(config, len(devices))
    try:
        arr = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, ValueError, NotImplementedError):
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def aot_compile(config: Any, topology: str) -> dict[str, Any]:
    """Compile the train step of ``config`` for ``topology``; returns the per-chip numbers."""
    import jax

    from metaclip_jax import config_schema
    from metaclip_jax.flops import forward_flops_per_example, train_step_flops
    from metaclip_jax.models import registry
    from train.state import abstract_train_state
    from train.step import batch_sharding, make_train_step

    gen, dims = parse_topology(topology)
    chip = CHIPS[gen]
    chips = math.prod(dims)
    config_schema.mesh_shape(config, chips)          # ConfigError before any compile
    devices = topology_devices(gen, dims)
    if len(devices) != chips:
        raise TopologyError(f"{topology}: libtpu gives {len(devices)} devices for {chips} chips")
    mesh = _mesh(config, devices)
    t0 = time.time()
    abstract_state, shardings = abstract_train_state(config, mesh)
    b = config.data.global_batch_size
    size = config_schema.model_image_size(config)
    ctx = config.data.context_length
    bs = batch_sharding(config, mesh)
    img_dtype = jax.numpy.uint8 if config.data.image_dtype == "uint8" else jax.numpy.float32
    batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), img_dtype, sharding=bs),
             "text": jax.ShapeDtypeStruct((b, ctx), jax.numpy.int32, sharding=bs)}
    step = make_train_step(config, mesh, shardings)
    lowered = step.lower(abstract_state, batch)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    per_chip = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes)
    xla_flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    arch = registry.get_model_type(config.model.type).model_config(config)
    flops = train_step_flops(arch, b, config.model.remat) / chips
    roofline = max(flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bandwidth)
    return {
        "config_preset": config.model.preset, "topology": f"{gen}:{'x'.join(map(str, dims))}", "chips": chips,
        "chip": chip.name, "mesh": dict(mesh.shape), "global_batch": b, "per_chip_batch": b // chips,
        "remat": config.model.remat, "dtype": config.model.dtype, "params": n_params,
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
        "per_chip_bytes": per_chip, "hbm_bytes": chip.hbm_bytes, "fits": per_chip <= chip.hbm_bytes,
        "flops_per_chip": flops, "xla_flops_per_chip": xla_flops, "bytes_accessed_per_chip": bytes_accessed,
        "fwd_gflops_per_example": forward_flops_per_example(arch) / 1e9,
        "roofline_step_s": roofline, "peak_bf16_flops": chip.peak_bf16_flops,
        "hbm_bandwidth": chip.hbm_bandwidth, "lower_s": t1 - t0, "compile_s": t2 - t1,
    }


def report(r: dict[str, Any]) -> str:
    g = lambda x: f"{x / GIB:.2f} GiB"
    lines = [
        f"{r['config_preset']} on {r['topology']} ({r['chips']} x {r['chip']}), mesh {r['mesh']}, "
        f"global batch {r['global_batch']} ({r['per_chip_batch']}/chip), {r['dtype']}, remat {r['remat']}",
        f"  per-chip memory  {g(r['per_chip_bytes'])} of {g(r['hbm_bytes'])} HBM "
        f"({100 * r['per_chip_bytes'] / r['hbm_bytes']:.0f}%): {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"    arguments {g(r['argument_bytes'])}, outputs {g(r['output_bytes'])}, temporaries "
        f"{g(r['temp_bytes'])}, donated/aliased {g(r['alias_bytes'])}",
        f"  FLOPs per step   {r['flops_per_chip']:.3e} per chip (model: {r['fwd_gflops_per_example']:.2f} "
        f"GFLOPs/example forward x passes + loss); XLA cost analysis {r['xla_flops_per_chip']:.3e} FLOPs, "
        f"{r['bytes_accessed_per_chip']:.3e} bytes (a scanned layer body counted once)",
        f"  roofline step    {r['roofline_step_s'] * 1e3:.1f} ms "
        f"(peak {r['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
        f"{r['hbm_bandwidth'] / 1e12:.2f} TB/s HBM)",
        f"  lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/file.py[:variant]")
    parser.add_argument("--topology", required=True, help="e.g. v5p:4x4x8, v5e:4x4, v4:2x2x2, v6e:8x8")
    parser.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments {bad} (config overrides look like --config.key=value)")

    from metaclip_jax.config_schema import ConfigError, load_config

    try:
        gen, dims = parse_topology(args.topology)
        config = load_config(args.config, rest, num_devices=math.prod(dims))
        result = aot_compile(config, args.topology)
    except (ConfigError, TopologyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report(result))
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0 if result["fits"] else 2


if __name__ == "__main__":
    sys.exit(main())
