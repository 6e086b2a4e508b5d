"""TPU VM launcher: a thin, testable wrapper around ``gcloud compute tpus``.

    python -m launch.tpu create    --name mc --zone us-east5-a --type v5p-128 [--spot | --queued]
    python -m launch.tpu setup     --name mc --zone us-east5-a
    python -m launch.tpu run       --name mc --zone us-east5-a --config configs/metaclip.py:b32_400m \
                                   --workdir gs://bucket/runs/b32 [-- --config.key=value ...]
    python -m launch.tpu logs      --name mc --zone us-east5-a [--worker 0]
    python -m launch.tpu supervise --name mc --zone us-east5-a --type v5p-128 --spot --config ... --workdir gs://...
    python -m launch.tpu stop|delete --name mc --zone us-east5-a

Every subcommand accepts ``--dry-run``, which prints the exact gcloud commands instead of running them.
Training resumes by itself from the newest complete checkpoint in ``--workdir``, so ``supervise`` only has
to recreate a preempted VM, set it up and start the same command again.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

REMOTE_DIR = "metaclip-jax"
LOG_FILE = "/tmp/metaclip-train.log"
DONE_MARKER = "DONE"  # written by train into the workdir when a run finishes

# Generation -> (default runtime version, chips per host for multi-host slices, cores per chip in names)
GENERATIONS = {
    "v4": ("tpu-ubuntu2204-base", 4, 2),
    "v5litepod": ("v2-alpha-tpuv5-lite", 4, 1),
    "v5p": ("v2-alpha-tpuv5", 4, 2),
    "v6e": ("v2-alpha-tpuv6e", 4, 1),
}
SINGLE_HOST_MAX_CHIPS = {"v4": 4, "v5litepod": 8, "v5p": 4, "v6e": 8}


@dataclasses.dataclass(frozen=True)
class Slice:
    """An accelerator type such as ``v5p-128`` (the number counts TensorCores for v4/v5p, chips else)."""

    generation: str
    size: int

    @classmethod
    def parse(cls, accelerator_type: str) -> Slice:
        m = re.fullmatch(r"(v4|v5litepod|v5e|v5p|v6e)-(\d+)", accelerator_type)
        if not m:
            raise ValueError(f"unknown TPU accelerator type {accelerator_type!r} "
                             "(expected e.g. v4-32, v5litepod-16, v5p-128, v6e-256)")
        gen = "v5litepod" if m.group(1) == "v5e" else m.group(1)
        return cls(gen, int(m.group(2)))

    @property
    def name(self) -> str:
        return f"{self.generation}-{self.size}"

    @property
    def chips(self) -> int:
        return self.size // GENERATIONS[self.generation][2]

    @property
    def hosts(self) -> int:
        if self.chips <= SINGLE_HOST_MAX_CHIPS[self.generation]:
            return 1
        return self.chips // GENERATIONS[self.generation][1]

    @property
    def runtime_version(self) -> str:
        return GENERATIONS[self.generation][0]


def _base(args: argparse.Namespace) -> list[str]:
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    s = Slice.parse(args.type)
    version = args.runtime_version or s.runtime_version
    if args.queued:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
               f"--node-id={args.name}", f"--accelerator-type={s.name}", f"--runtime-version={version}",
               *_base(args)]
        if args.spot:
            cmd.append("--spot")
        return [cmd]
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, f"--accelerator-type={s.name}",
           f"--version={version}", *_base(args)]
    if args.spot:
        cmd.append("--spot")
    return [cmd]


def ssh(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_base(args), f"--worker={worker}",
            f"--command={command}"]


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    """Copy the code (a git archive of HEAD) to every worker and install requirements-tpu.txt."""
    tarball = "/tmp/metaclip-jax.tar.gz"
    install = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR}"
               f" && tar -xzf {tarball.split('/')[-1]} -C {REMOTE_DIR} && cd {REMOTE_DIR}"
               " && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip"
               " && .venv/bin/pip install -q -r requirements-tpu.txt")
    return [
        ["git", "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:~/", *_base(args),
         "--worker=all"],
        ssh(args, install),
    ]


def train_command(args: argparse.Namespace) -> str:
    overrides = " ".join(shlex.quote(o) for o in args.overrides)
    cmd = (f"cd {REMOTE_DIR} && nohup .venv/bin/python -m train --config {shlex.quote(args.config)} "
           f"--workdir {shlex.quote(args.workdir)} {overrides}").rstrip()
    return f"{cmd} > {LOG_FILE} 2>&1 &"


def run_commands(args: argparse.Namespace) -> list[list[str]]:
    if not args.workdir.startswith("gs://") and not args.allow_local_workdir:
        raise ValueError("multi-host TPU runs need a shared gs:// workdir (checkpoints are written by every "
                         "host); pass --allow-local-workdir for a single-host experiment")
    return [ssh(args, train_command(args))]


def logs_commands(args: argparse.Namespace) -> list[list[str]]:
    return [ssh(args, f"tail -n 200 -F {LOG_FILE}", worker=str(args.worker))]


def stop_commands(args: argparse.Namespace) -> list[list[str]]:
    # SIGTERM lets train save a final checkpoint before exiting (same path as a preemption).
    return [ssh(args, "pkill -TERM -f 'python -m train' || true")]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    if args.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_base(args),
                 "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_base(args), "--quiet"]]


def state_command(args: argparse.Namespace) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_base(args),
            "--format=value(state)"]


def done_command(args: argparse.Namespace) -> list[str]:
    return ["gcloud", "storage", "ls", f"{args.workdir.rstrip('/')}/{DONE_MARKER}"]


def execute(cmds: Sequence[Sequence[str]], dry_run: bool) -> None:
    for cmd in cmds:
        print(shlex.join(cmd), flush=True)
        if not dry_run:
            subprocess.run(cmd, check=True)


def supervise(args: argparse.Namespace) -> None:
    """Keep a run alive across preemptions: (re)create, set up and start until the DONE marker exists."""
    attempt = 0
    while True:
        attempt += 1
        print(f"[supervise] attempt {attempt}: creating {args.type} {args.name}", flush=True)
        execute(create_commands(args) + setup_commands(args) + run_commands(args), args.dry_run)
        if args.dry_run:
            print(shlex.join(state_command(args)))
            print(shlex.join(done_command(args)))
            print(f"[supervise] then poll every {args.poll_seconds}s; on PREEMPTED or a missing VM: "
                  "delete, recreate, set up and start again (train resumes from the newest checkpoint)")
            return
        while True:
            time.sleep(args.poll_seconds)
            if subprocess.run(done_command(args), capture_output=True).returncode == 0:
                print("[supervise] run finished", flush=True)
                return
            state = subprocess.run(state_command(args), capture_output=True, text=True).stdout.strip()
            if state in ("PREEMPTED", "TERMINATED", ""):
                break
        if attempt > args.max_restarts:
            raise SystemExit(f"[supervise] giving up after {attempt} attempts (last state {state!r})")
        print(f"[supervise] VM state {state or 'missing'}: recreating", flush=True)
        subprocess.run(delete_commands(args)[0])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["create", "setup", "run", "logs", "stop", "delete", "supervise"])
    p.add_argument("--name", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--project")
    p.add_argument("--type", default="v5p-8", help="accelerator type, e.g. v4-32, v5litepod-16, v5p-128")
    p.add_argument("--runtime-version")
    p.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    p.add_argument("--queued", action="store_true", help="use queued resources")
    p.add_argument("--config")
    p.add_argument("--workdir", default="")
    p.add_argument("--allow-local-workdir", action="store_true")
    p.add_argument("--worker", default=0)
    p.add_argument("--poll-seconds", type=int, default=120)
    p.add_argument("--max-restarts", type=int, default=100)
    p.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.overrides = overrides  # --config.key=value overrides for train, after a literal --
    if args.action in ("run", "supervise") and (not args.config or not args.workdir):
        p.error(f"{args.action} needs --config and --workdir")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    s = Slice.parse(args.type)
    version = args.runtime_version or s.runtime_version
    print(f"# {s.name}: {s.chips} chips on {s.hosts} host(s), runtime {version}", file=sys.stderr)
    builders = {"create": create_commands, "setup": setup_commands, "run": run_commands,
                "logs": logs_commands, "stop": stop_commands, "delete": delete_commands}
    if args.action == "supervise":
        supervise(args)
    else:
        execute(builders[args.action](args), args.dry_run)


if __name__ == "__main__":
    main()
