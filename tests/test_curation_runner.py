"""Local runner: same seed -> same subset whatever the sharding and worker count; resume; error rate."""

from __future__ import annotations

import os

import numpy as np
import pytest

from curation import balancing
from curation.config import ConfigError, from_dict, load_config
from curation.pack import iter_records, read_manifest
from curation.runner import CurationError, run
from tests.curation_pools import make_rows, write_jsonl, write_jsonl_pool, write_metadata


def cfg_for(tmp, inputs, name="run", **over):
    d = {"inputs": inputs, "workdir": str(tmp / name), "metadata": str(tmp / "meta.json"), "workers": 1,
         "progress": False, "balance": {"t": 40, "mode": "per_image", "seed": 0}}
    for k, v in over.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    return from_dict(d).validate()


def records(out_dir):
    return [(r.uid, r.url, r.texts, r.entry_ids, r.keep_prob) for r in iter_records(out_dir)]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    write_metadata(str(tmp / "meta.json"))
    rows = make_rows(900, seed=5)
    one = write_jsonl_pool(str(tmp / "one"), rows, 1)
    four = write_jsonl_pool(str(tmp / "four"), rows, 4)
    return tmp, rows, one, four


@pytest.mark.parametrize("mode,rng_key", [("per_image", "uid"), ("per_text", "uid"), ("per_image", "index")])
def test_same_subset_any_sharding_and_workers(pool, mode, rng_key):
    tmp, rows, one, four = pool
    bal = {"mode": mode, "rng_key": rng_key, "seed": 3}
    a = run(cfg_for(tmp, one, f"a-{mode}-{rng_key}", workers=1, balance=bal))
    workers = 2 if (mode, rng_key) == ("per_image", "uid") else 1  # process pools cost ~2 s each here
    b = run(cfg_for(tmp, [str(tmp / "four" / "*.jsonl")], f"b-{mode}-{rng_key}", workers=workers,
                    balance=bal))
    ra, rb = records(tmp / f"a-{mode}-{rng_key}" / "out"), records(tmp / f"b-{mode}-{rng_key}" / "out")
    assert ra == rb and len(ra) > 0
    assert a["counts"]["records"] == b["counts"]["records"] == len(ra)
    assert len(b["shards"]) == 4 and len(a["shards"]) == 1
    # balancing happened: some matched images dropped; every record carries matched ids
    assert len(ra) < a["counts"]["matched_texts" if mode == "per_text" else "rows"]
    assert all(ids for r in ra for ids in r[3])
    if mode == "per_image":
        assert len({r[0] for r in ra}) == len(ra)  # one record per image
    if workers == 2:
        c = run(cfg_for(tmp, one, f"c-{mode}-{rng_key}", balance={**bal, "seed": 4}))
        assert records(tmp / f"c-{mode}-{rng_key}" / "out") != ra  # another seed, another subset
        assert c["counts"]["matches"] == a["counts"]["matches"]


def test_counts_and_selected_pairs_follow_the_rule(pool):
    tmp, rows, one, _ = pool
    run(cfg_for(tmp, one, "rule", balance={"t": 25, "mode": "per_text"}))
    wd = tmp / "rule"
    counts = np.load(wd / "count" / "entry_counts.npy")
    assert counts.dtype == np.uint64
    probs = np.load(wd / "balance" / "entry_probs.npy")
    np.testing.assert_allclose(probs, balancing.entry_probs(counts, 25), rtol=1e-6)
    # head entries are capped near t in expectation; kept pairs of the top entry shrink a lot
    recs = list(iter_records(str(wd / "out")))
    top = int(np.argmax(counts))
    kept_top = sum(top in ids for r in recs for ids in r.entry_ids)
    assert kept_top < counts[top] * 0.8


def test_tail_proportion_and_mode_none(pool):
    tmp, rows, one, _ = pool
    res = run(cfg_for(tmp, one, "tp", balance={"t": None, "tail_proportion": 0.3, "mode": "none"}))
    counts = np.load(tmp / "tp" / "count" / "entry_counts.npy")
    assert res["balance"]["t"] == balancing.p_to_t(counts, 0.3)
    recs = list(iter_records(str(tmp / "tp" / "out")))
    # mode none: every image with >= 1 matched text, all matched texts, with their keep probabilities
    assert len(recs) == res["counts"]["rows"] - sum(
        1 for r in rows if all(t.startswith("zzz") for t in dict.fromkeys(r["caption"])))
    probs = balancing.entry_probs(counts, res["balance"]["t"])
    for r in recs[:50]:
        for ids, kp in zip(r.entry_ids, r.keep_prob):
            assert kp == pytest.approx(1 - np.prod([1 - probs[e] for e in ids]))
    with pytest.raises(ConfigError, match="conflict"):
        cfg_for(tmp, one, "x", balance={"t": 10, "tail_proportion": 0.3})


def test_rerun_skips_done_work_and_is_identical(pool, capsys, monkeypatch):
    tmp, rows, _, four = pool
    cfg = cfg_for(tmp, four, "rerun")
    run(cfg)
    out = tmp / "rerun" / "out"
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if f.endswith(".array_record")}
    capsys.readouterr()
    run(cfg)
    err = capsys.readouterr().err
    assert "4 already done, 0 to do" in err and "4 shards done, 0 to do" in err
    after = {f: (out / f).read_bytes() for f in os.listdir(out) if f.endswith(".array_record")}
    assert before == after
    # a changed t redoes balance and pack, not match (and drops the old manifest before packing)
    cfg10 = cfg_for(tmp, four, "rerun", balance={"t": 10})
    run(cfg10, until="balance")
    assert (out / "manifest.json").exists()
    from curation import runner as R

    with monkeypatch.context() as mp:
        mp.setattr(R, "pack_shard", None)  # packing fails at its first shard
        with pytest.raises(TypeError):
            run(cfg10)
    assert not (out / "manifest.json").exists()
    capsys.readouterr()
    run(cfg10)
    err = capsys.readouterr().err
    assert "4 already done, 0 to do" in err and "0 shards done, 4 to do" in err
    # a changed input file redoes its own shard only
    write_jsonl(four[2], make_rows(50, seed=9))
    run(cfg_for(tmp, four, "rerun", workers=1, balance={"t": 10}))
    assert "3 already done, 1 to do" in capsys.readouterr().err


def test_error_rate_fails_with_reason_then_continues(tmp_path):
    write_metadata(str(tmp_path / "meta.json"))
    files = write_jsonl_pool(str(tmp_path / "bad"), make_rows(200, seed=1), 2, bad_lines=30)
    cfg = cfg_for(tmp_path, files, "err", max_error_rate=0.05)
    with pytest.raises(CurationError, match=r"exceeds max_error_rate 5\.00%.*bad_json"):
        run(cfg)
    res = run(cfg_for(tmp_path, files, "err", max_error_rate=0.5))
    assert res["bad_input"]["skipped_rows"] == {"bad_json": 60}
    assert res["error_rate"] == pytest.approx(60 / 260)
    assert read_manifest(str(tmp_path / "err" / "out"))["counts"]["rows"] == 200


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'balanse'"):
        from_dict({"balanse": {}})
    with pytest.raises(ConfigError, match="balance.mode"):
        from_dict({"inputs": ["x"], "metadata": "m", "balance": {"mode": "sometimes"}}).validate()
    with pytest.raises(ConfigError, match="balance.t: expected a number"):
        from_dict({"balance": {"t": "lots"}})
    with pytest.raises(ConfigError, match="unknown source option|unknown config key 'source.url_col'"):
        from_dict({"source": {"url_col": "u"}})
    py = tmp_path / "cfg.py"
    py.write_text("def get_config(arg=None):\n"
                  "    return {'inputs': ['a.jsonl'], 'metadata': 'm.json',\n"
                  "            'balance': {'t': 170000 if arg == 'b' else 20000}}\n")
    assert load_config(str(py)).balance.t == 20000
    assert load_config(f"{py}:b").balance.t == 170000
    assert load_config(str(py), ["balance.t=5", "source.text_fields=[\"alt\",\"title\"]"]).balance.t == 5
    assert load_config(str(py), ["source.text_fields=[\"alt\"]"]).source.text_fields == ("alt",)
    assert load_config(str(py), ["balance.t=inf"]).balance.t is None
