"""The curation command line, including the fixed ``match`` contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.matching import Matcher
from tests.curation_pools import ENTRIES, make_rows, write_jsonl_pool, write_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "curation", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def texts():
    rows = make_rows(400, seed=8)
    out = [t for r in rows for t in r["caption"]][:600]
    out[3] = None  # missing text
    out[5] = ""
    out[7] = "New York City, a dog!"
    return out


def test_match_contract_parquet(tmp_path, texts):
    meta = write_metadata(str(tmp_path / "meta.json"))
    pq.write_table(pa.table({"id": list(range(len(texts))), "caption": pa.array(texts, pa.string())}),
                   tmp_path / "in.parquet")
    p = cli("match", "--metadata", meta, "--input", tmp_path / "in.parquet", "--text-field", "caption",
            "--output", tmp_path / "out.parquet")
    info = json.loads(p.stdout)
    assert info["rows"] == len(texts) and info["workers"] == (os.cpu_count() or 1)
    out = pq.read_table(tmp_path / "out.parquet")
    ids = out.column("entry_ids").to_pylist()
    assert len(ids) == len(texts)  # one row per input row, in input order
    assert out.column("caption").to_pylist() == texts
    m = Matcher(ENTRIES)
    for t, got in zip(texts, ids):
        assert got == (m.match(t) if t else [])
        assert got == sorted(set(got))
    assert ids[3] == [] and ids[5] == []
    assert ids[7] == sorted(ENTRIES.index(e) for e in ("dog", "New York", "York City"))
    assert any(ids) and not all(ids)


def test_match_contract_jsonl(tmp_path, texts):
    meta = write_metadata(str(tmp_path / "meta.json"))
    with open(tmp_path / "in.jsonl", "w") as f:
        for k, t in enumerate(texts):
            f.write(json.dumps({"k": k, "alt": t} if t is not None else {"k": k}) + "\n")
        f.write("{broken\n")  # a broken line is still a row: empty entry_ids
    cli("match", "--metadata", meta, "--input", tmp_path / "in.jsonl", "--text-field", "alt",
        "--output", tmp_path / "out.parquet", "--workers", "1")
    ids = pq.read_table(tmp_path / "out.parquet").column("entry_ids").to_pylist()
    m = Matcher(ENTRIES)
    assert ids == [m.match(t) if t else [] for t in texts] + [[]]


def test_run_report_and_balance_commands(tmp_path):
    meta = write_metadata(str(tmp_path / "meta.json"))
    files = write_jsonl_pool(str(tmp_path / "pool"), make_rows(200, seed=2), 2, bad_lines=2)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"inputs": files, "workdir": str(tmp_path / "wd"), "metadata": meta,
                               "balance": {"t": 1000}, "max_error_rate": 0.05}))
    p = cli("run", "--config", cfg, "--config.balance.t=25", "--workers", "1", "--no-progress")
    res = json.loads(p.stdout)
    assert res["balance"]["t"] == 25 and res["counts"]["rows"] == 200
    assert res["error_rate"] == pytest.approx(4 / 204)
    assert "[curation] done" in p.stderr
    assert (tmp_path / "wd" / "out" / "manifest.json").exists()
    assert (tmp_path / "wd" / "report" / "kept_vs_t.png").exists()
    p = cli("report", "--workdir", tmp_path / "wd")
    assert json.loads(p.stdout)["balance"]["t"] == 25
    counts = tmp_path / "wd" / "count" / "entry_counts.npy"
    p = cli("balance", "--counts", counts, "--t", "25")
    from curation.balancing import p_to_t, t_to_p

    c = np.load(counts)
    assert json.loads(p.stdout)["tail_proportion"] == pytest.approx(t_to_p(c, 25))
    p = cli("balance", "--counts", counts, "--tail-proportion", "0.06")
    assert json.loads(p.stdout)["t"] == p_to_t(c, 0.06)
    p = cli("metadata", "--metadata", meta)
    assert json.loads(p.stdout)["entries"] == len(ENTRIES)


def test_cli_errors_are_clear(tmp_path):
    meta = write_metadata(str(tmp_path / "meta.json"))
    files = write_jsonl_pool(str(tmp_path / "pool"), make_rows(20, seed=2), 1, bad_lines=10)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"inputs": files, "workdir": str(tmp_path / "wd"), "metadata": meta}))
    p = cli("run", "--config", cfg, "--config.balance.tt=3", check=False)
    assert p.returncode != 0 and "unknown config key 'balance.tt'" in p.stderr
    p = cli("run", "--config", cfg, "--workers", "1", "--no-progress", check=False)
    assert p.returncode == 2 and "exceeds max_error_rate" in p.stderr and "bad_json" in p.stderr
    p = cli("match", "--metadata", meta, "--input", files[0], check=False)
    assert p.returncode != 0 and "--text-field" in p.stderr


def test_curation_does_not_import_jax():
    code = ("import sys, curation.runner, curation.pack, curation.report, curation.sources, curation.stages, "
            "curation.balancing, curation.config, curation.__main__, curation.matching, curation.metadata; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
