"""Curation command line: ``python -m curation <command> ...``.

  run       the whole stage: match -> count -> balance -> pack -> report (local runner, or --runner beam)
  metadata  load and check a metadata file (entry count, duplicates, empties)
  match     match one parquet/JSONL file (fixed contract), or run the runner up to match (--config)
  count     run the runner up to the global count
  balance   run the runner up to balancing, or convert t <-> tail proportion on a counts file
  pack      run the runner up to packing, or join img2dataset downloads into curated records
  report    write the curation report of a work folder

Configs: ``--config FILE.json | FILE.py | FILE.py:variant`` plus ``--config.key=value`` overrides
(``--config.balance.t=20000``). See docs/curation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True, default=str))


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pull ``--config.key=value`` / ``--config.key value`` out of argv."""
    rest, overrides = [], []
    it = iter(range(len(argv)))
    argv = list(argv)
    for k in it:
        a = argv[k]
        if a.startswith("--config."):
            body = a[len("--config."):]
            if "=" not in body:
                if k + 1 >= len(argv):
                    raise SystemExit(f"error: {a} needs a value")
                body = f"{body}={argv[k + 1]}"
                next(it)
            overrides.append(body)
        else:
            rest.append(a)
    return rest, overrides


def _load(args: argparse.Namespace, overrides: list[str]) -> Any:
    from curation.config import ConfigError, load_config

    extra = list(overrides)
    if getattr(args, "workers", None):
        extra.append(f"workers={args.workers}")
    if getattr(args, "no_progress", False):
        extra.append("progress=false")
    try:
        return load_config(args.config, extra)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None


def _run_stage(args: argparse.Namespace, overrides: list[str], until: str) -> int:
    from curation.config import ConfigError
    from curation.runner import CurationError, run

    cfg = _load(args, overrides)
    if getattr(args, "runner", "local") == "beam":
        from curation.beam_pipeline import run_beam

        _print(run_beam(cfg, args.beam_args))
        return 0
    try:
        result = run(cfg, until=until)
    except (CurationError, ConfigError) as e:
        print(f"curation failed: {e}", file=sys.stderr)
        return 2
    _print({k: v for k, v in result.items() if k in ("counts", "balance", "error_rate", "match", "count")})
    return 0


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="FILE.json | FILE.py[:variant]")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes (default: config, else cpu count)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, beam_args = argv[:k], argv[k + 1:]
    argv, overrides = _split_overrides(argv)

    ap = argparse.ArgumentParser(prog="python -m curation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="the whole curation stage")
    _add_config(p)
    p.add_argument("--until", default="report", choices=["match", "count", "balance", "pack", "report"])
    p.add_argument("--runner", default="local", choices=["local", "beam"],
                   help="local multi-process runner (default) or Apache Beam; Beam pipeline options go "
                        "after '--' (e.g. -- --runner=DataflowRunner --project=...)")

    p = sub.add_parser("metadata", help="load and check a metadata file, or build an offline approximation")
    p.add_argument("--metadata", help="metadata JSON to load and check")
    p.add_argument("--build-offline", action="store_true",
                   help="build the offline approximation of the MetaCLIP 1 list (requirements-metadata.txt)")
    p.add_argument("--budget", type=int, default=500_000)
    p.add_argument("--output", default="", help="write the entry list as JSON")

    p = sub.add_parser("match", help="match one file (fixed contract) or run up to match (--config)")
    p.add_argument("--metadata")
    p.add_argument("--input")
    p.add_argument("--text-field")
    p.add_argument("--output")
    p.add_argument("--mode", default="v1", choices=["v1", "v2"])
    _add_config(p, required=False)

    p = sub.add_parser("count", help="run up to the global entry count")
    _add_config(p)

    p = sub.add_parser("balance", help="run up to balancing, or convert t <-> tail proportion")
    _add_config(p, required=False)
    p.add_argument("--counts", help="entry_counts.npy: print t_to_p / p_to_t instead of running")
    p.add_argument("--t", type=float)
    p.add_argument("--tail-proportion", type=float)

    p = sub.add_parser("pack", help="run up to packing, or join img2dataset downloads")
    _add_config(p, required=False)
    p.add_argument("--join-downloaded", metavar="DIR", help="img2dataset output folder (parquet or tar)")
    p.add_argument("--curated", help="curated output folder (with manifest.json) to join")
    p.add_argument("--output", help="output folder for the joined shards")
    p.add_argument("--image-column", default="jpg")

    p = sub.add_parser("report", help="write the report of a work folder")
    p.add_argument("--workdir", required=True)

    args = ap.parse_args(argv)
    args.beam_args = beam_args
    if overrides and not getattr(args, "config", None):
        ap.error("--config.key=value overrides need --config")

    if args.cmd == "run":
        return _run_stage(args, overrides, args.until)

    if args.cmd == "metadata":
        from curation import metadata as md

        if args.build_offline:
            entries = md.build_offline_metadata(args.budget)
        elif args.metadata:
            entries = list(md.load_metadata(args.metadata))
        else:
            ap.error("metadata needs --metadata FILE or --build-offline")
        info = {"entries": len(entries), "unique": len(set(entries)),
                "empty": sum(1 for e in entries if not e), "first": entries[:5]}
        if args.output:
            md.save_metadata(entries, args.output)
            info["output"] = args.output
        _print(info)
        return 0

    if args.cmd == "match":
        if args.config:
            return _run_stage(args, overrides, "match")
        missing = [n for n in ("metadata", "input", "text_field", "output") if not getattr(args, n)]
        if missing:
            ap.error("match needs --config, or all of --metadata --input --text-field --output "
                     f"(missing: {', '.join('--' + m.replace('_', '-') for m in missing)})")
        from curation.runner import CurationError, match_file

        try:
            _print(match_file(args.metadata, args.input, args.text_field, args.output, mode=args.mode,
                              workers=args.workers or os.cpu_count()))
        except CurationError as e:
            print(f"match failed: {e}", file=sys.stderr)
            return 2
        return 0

    if args.cmd == "count":
        return _run_stage(args, overrides, "count")

    if args.cmd == "balance":
        if args.counts:
            import numpy as np

            from curation.balancing import p_to_t, t_to_p

            counts = np.load(args.counts)
            if (args.t is None) == (args.tail_proportion is None):
                ap.error("with --counts give exactly one of --t or --tail-proportion")
            if args.t is not None:
                _print({"t": args.t, "tail_proportion": t_to_p(counts, args.t)})
            else:
                t = p_to_t(counts, args.tail_proportion)
                _print({"tail_proportion": args.tail_proportion, "t": t,
                        "tail_proportion_at_t": t_to_p(counts, t)})
            return 0
        if not args.config:
            ap.error("balance needs --config (or --counts for a t <-> p conversion)")
        if args.t is not None:
            overrides.append(f"balance.t={args.t}")
        if args.tail_proportion is not None:
            overrides += ["balance.t=null", f"balance.tail_proportion={args.tail_proportion}"]
        return _run_stage(args, overrides, "balance")

    if args.cmd == "pack":
        if args.join_downloaded:
            if not (args.curated and args.output):
                ap.error("--join-downloaded needs --curated and --output")
            from curation.pack import join_downloaded

            _print(join_downloaded(args.curated, args.join_downloaded, args.output,
                                   image_column=args.image_column)["counts"])
            return 0
        if not args.config:
            ap.error("pack needs --config (or --join-downloaded)")
        return _run_stage(args, overrides, "pack")

    if args.cmd == "report":
        from curation.report import write_report

        rep = write_report(args.workdir)
        _print({"report": os.path.join(args.workdir, "report"), "totals": rep["totals"],
                "balance": rep["balance"], "entries": rep["entries"]})
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
