"""launch.tpu --dry-run prints the exact gcloud commands, for several topologies."""

import shlex

import pytest

from launch import tpu


@pytest.mark.parametrize("acc,chips,hosts,version", [
    ("v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v5p-128", 64, 16, "v2-alpha-tpuv5"),
    ("v6e-256", 256, 64, "v2-alpha-tpuv6e"),
])
def test_slice_geometry(acc, chips, hosts, version):
    s = tpu.Slice.parse(acc)
    assert (s.chips, s.hosts, s.runtime_version) == (chips, hosts, version)


def test_unknown_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown TPU accelerator type"):
        tpu.Slice.parse("v9-8")


def _lines(capsys, argv):
    tpu.main(argv if "--dry-run" in argv else argv + ["--dry-run"])
    return [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()
            if not line.startswith("[supervise]")]


BASE = ["--name", "mc", "--zone", "us-east5-a", "--project", "proj"]


def test_create_plain_spot_and_queued(capsys):
    (cmd,) = _lines(capsys, ["create", *BASE, "--type", "v5p-128"])
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mc", "--accelerator-type=v5p-128",
                   "--version=v2-alpha-tpuv5", "--zone=us-east5-a", "--project=proj"]
    (cmd,) = _lines(capsys, ["create", *BASE, "--type", "v6e-256", "--spot"])
    assert cmd[-1] == "--spot" and "--version=v2-alpha-tpuv6e" in cmd
    (cmd,) = _lines(capsys, ["create", *BASE, "--type", "v5litepod-16", "--queued", "--spot"])
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "mc"]
    assert "--node-id=mc" in cmd and "--runtime-version=v2-alpha-tpuv5-lite" in cmd and "--spot" in cmd


def test_setup_copies_code_to_every_worker_and_installs_tpu_requirements(capsys):
    archive, scp, install = _lines(capsys, ["setup", *BASE, "--type", "v4-32"])
    assert archive[:2] == ["git", "archive"]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert "--worker=all" in install
    assert "pip install -q -r requirements-tpu.txt" in install[-1]


def test_run_needs_gcs_workdir_and_passes_overrides(capsys):
    (cmd,) = _lines(capsys, ["run", *BASE, "--config", "configs/metaclip.py:b32_400m",
                             "--workdir", "gs://bucket/runs/b32", "--dry-run", "--", "--config.seed=3"])
    assert "--worker=all" in cmd
    remote = cmd[-1].removeprefix("--command=")
    assert "python -m train --config configs/metaclip.py:b32_400m --workdir gs://bucket/runs/b32" in remote
    assert "--config.seed=3" in remote and remote.endswith("&")
    with pytest.raises(ValueError, match="gs://"):
        tpu.main(["run", *BASE, "--config", "c.py", "--workdir", "/tmp/x", "--dry-run"])


def test_logs_stop_delete(capsys):
    (logs,) = _lines(capsys, ["logs", *BASE])
    assert "--worker=0" in logs and "tail" in logs[-1]
    (stop,) = _lines(capsys, ["stop", *BASE])
    assert "pkill -TERM" in stop[-1]  # SIGTERM -> final checkpoint, like a preemption
    (delete,) = _lines(capsys, ["delete", *BASE])
    assert delete[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"] and "--quiet" in delete
    (qdel,) = _lines(capsys, ["delete", *BASE, "--queued"])
    assert qdel[3] == "queued-resources" and "--force" in qdel


def test_supervise_dry_run_shows_the_whole_cycle(capsys):
    cmds = _lines(capsys, ["supervise", *BASE, "--type", "v5p-128", "--spot", "--config", "c.py",
                           "--workdir", "gs://b/r"])
    verbs = [c[4] if c[0] == "gcloud" and len(c) > 4 else c[1] for c in cmds]
    assert verbs[:5] == ["create", "archive", "scp", "ssh", "ssh"]
    assert cmds[-2][-1] == "--format=value(state)"
    assert cmds[-1] == ["gcloud", "storage", "ls", "gs://b/r/DONE"]
