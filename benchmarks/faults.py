"""The fault suite as a table: trials run, faults survived, records lost, bad inputs tried and counted.

    python -m benchmarks.faults [--quick] [--workers N] [--seeds 0,1,2]

Runs ``pytest -m faults tests/faults`` in a subprocess (pytest-xdist, ``-n 2`` by default) with
``METACLIP_FAULTS_RESULTS`` pointing at a fresh JSON-lines file; every fault test appends one line per trial
(``tests/faults/trials.py``). The randomised kill trials run for each seed of ``--seeds`` (default 0,1,2 for
every family); ``--quick`` runs the suite's own defaults, i.e. exactly what ``make test`` runs (curation kills
with seeds 0,1,2, the training chain and the NaN trial with seed 0). A pytest JUnit report
gives the pass / fail / xfail counts. The last line is the headline: records lost (target 0).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITES = [("curation", "curation kill -9 (match / balance / pack), rerun"),
          ("train", "training SIGKILL / SIGTERM / kill mid async save / damaged newest / NaN"),
          ("checkpoint", "damaged newest checkpoint -> fallback (Checkpointer)"),
          ("inputs", "corrupt inputs: curation rows/files, loader records/images"),
          ("config", "misconfiguration rejected before compile"),
          ("security", "no pickle loads in project code (AST scan)")]


def run_suite(seeds: str | None, workers: int, results: str, junit: str) -> tuple[int, float, str]:
    env = {**os.environ, "METACLIP_FAULTS_RESULTS": results, "METACLIP_FAULTS_SEEDS": seeds or ""}
    cmd = [sys.executable, "-m", "pytest", "-m", "faults", "tests/faults", "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "--timeout", "900"]
    if workers > 1:
        cmd += ["-n", str(workers)]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return p.returncode, time.time() - t0, p.stdout[-3000:] + p.stderr[-2000:]


def junit_counts(path: str) -> dict[str, int]:
    out = collections.Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {c.tag for c in case}
        if "failure" in kinds or "error" in kinds:
            out["failed"] += 1
        elif "skipped" in kinds:
            msg = next(c.get("type", "") + c.get("message", "") for c in case if c.tag == "skipped")
            out["xfailed" if "xfail" in msg else "skipped"] += 1
        else:
            out["passed"] += 1
    return dict(out)


def table(rows: list[dict]) -> tuple[str, dict[str, int]]:
    by = collections.defaultdict(list)
    for r in rows:
        by[r["suite"]].append(r)
    head = ("| suite | what | trials | survived | records lost | bad inputs tried | bad inputs counted |\n"
            "|---|---|---|---|---|---|---|")
    lines, tot = [head], collections.Counter()
    for suite, what in SUITES + [(s, s) for s in sorted(set(by) - {s for s, _ in SUITES})]:
        rs = by.get(suite, [])
        if not rs:
            continue
        c = {"trials": len(rs), "survived": sum(r["survived"] for r in rs),
             "lost": sum(r["records_lost"] for r in rs), "tried": sum(r["bad_inputs_tried"] for r in rs),
             "counted": sum(r["bad_inputs_counted"] for r in rs)}
        tot.update(c)
        lines.append(f"| {suite} | {what} | {c['trials']} | {c['survived']} | {c['lost']} | {c['tried']} | "
                     f"{c['counted']} |")
    lines.append(f"| **total** | | **{tot['trials']}** | **{tot['survived']}** | **{tot['lost']}** | "
                 f"**{tot['tried']}** | **{tot['counted']}** |")
    return "\n".join(lines), dict(tot)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the suite's default seeds (what make test runs)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds, every kill family (default 0,1,2)")
    ap.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    args = ap.parse_args(argv)
    seeds = args.seeds or (None if args.quick else "0,1,2")
    shown = seeds or "suite defaults"
    with tempfile.TemporaryDirectory(prefix="faults-bench-") as tmp:
        results, junit = os.path.join(tmp, "trials.jsonl"), os.path.join(tmp, "junit.xml")
        print(f"running pytest -m faults tests/faults (-n {args.workers}, seeds {shown}) ...",
              file=sys.stderr, flush=True)
        rc, wall, tail = run_suite(seeds, args.workers, results, junit)
        rows = []
        if os.path.exists(results):
            with open(results) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        counts = junit_counts(junit) if os.path.exists(junit) else {}
    text, tot = table(rows)
    print(text)
    print()
    print(f"pytest: {counts} in {wall:.0f} s wall (-n {args.workers}, seeds {shown}); exit status {rc}")
    known = [f"{r['trial']} ({r['known_issue']})" for r in rows if not r["survived"] and r.get("known_issue")]
    failed = [r["trial"] for r in rows if not r["survived"] and not r.get("known_issue")]
    if known:
        print("known issues (xfail in the suite): " + ", ".join(known))
    if failed:
        print("trials NOT survived: " + ", ".join(failed))
    if rc != 0:
        print(tail, file=sys.stderr)
    print(f"headline: records_lost {tot.get('lost', 0)} count (target 0)")
    return 0 if rc == 0 and not failed and tot.get("lost", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
