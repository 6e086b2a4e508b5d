"""``python -m train --config configs/<file>.py[:variant] --workdir DIR [--config.key=value ...]``.

Starts a run, or resumes it from the newest complete checkpoint in ``DIR/checkpoints``. Exit status:
0 when training completed or stopped for preemption (SIGTERM: saved, then exited), 1 when the run
stopped on a non-finite loss (the last good checkpoint is intact), 2 for a bad config or command line.
``--workdir`` may be a local path or ``gs://bucket/run`` (``config.workdir`` is used when it is omitted).
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: any number of --config.a.b=value (typed by the schema; unknown keys are errors).")
    parser.add_argument("--config", required=True, help="configs/<file>.py[:variant]")
    parser.add_argument("--workdir", default=None, help="run folder (local or gs://); default config.workdir")
    parser.add_argument("--log_level", default="INFO")
    args, rest = parser.parse_known_args(argv)
    overrides, bad = [], []
    i = 0
    while i < len(rest):
        a = rest[i]
        if a.startswith("--config.") and "=" not in a and i + 1 < len(rest):
            a = f"{a}={rest[i + 1]}"  # "--config.key value"
            i += 1
        (overrides if a.startswith("--config.") else bad).append(a)
        i += 1
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # Grain reads absl flags: mark them parsed (we use argparse).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

    import jax

    from metaclip_jax.config_schema import ConfigError, load_config
    from train import loop  # registers the loop's config fields before validation
    from train.mesh import maybe_initialize_distributed

    maybe_initialize_distributed()  # before any backend use (multi-host TPU slices)

    try:
        config = load_config(args.config, overrides, num_devices=jax.device_count())
    except (ConfigError, ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        print(f"config error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname).1s %(name)s] %(message)s", datefmt="%H:%M:%S",
                        force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save INFO chatter
    workdir = args.workdir or config.get("workdir")
    if not workdir:
        print("config error: no workdir (pass --workdir or set config.workdir)", file=sys.stderr)
        return 2
    with config.unlocked():
        config.workdir = workdir
    try:
        summary = loop.train_and_evaluate(config, workdir)
    except loop.TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    logging.getLogger("train").info("exit: %s at step %d", summary["stop_reason"], summary["step"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
