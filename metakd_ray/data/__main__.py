"""``python -m metakd_ray.data``: fetch a corpus, or describe a config's splits.

    python -m metakd_ray.data fetch amazon [--root DIR] [--url URL] [--sha256 HEX]
    python -m metakd_ray.data describe CONFIG [key=value ...] [--json] [--rate R --seed S]

Errors are printed as ``error: ...`` lines on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metakd_ray import config
from metakd_ray.data.fetch import DEFAULT_URL, fetch_amazon
from metakd_ray.data.readers import DataError, data_root

# metakd_ray.data.splits (datasets, sklearn) is imported only once the config and arguments are known to be
# good, so that mistakes are reported at once.

PROG = "python -m metakd_ray.data"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _fetch(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=f"{PROG} fetch", description="Download and verify a corpus into the data root.")
    ap.add_argument("corpus", choices=["amazon"])
    ap.add_argument("--root", help="data root (default: $METAKD_DATA, else ~/.cache/metakd_ray/data)")
    ap.add_argument("--url", default=DEFAULT_URL)
    ap.add_argument("--sha256", help="expected sha256 of the archive")
    args = ap.parse_args(argv)
    root = Path(args.root) if args.root else data_root(config.DataConfig())
    try:
        print(fetch_amazon(root, url=args.url, sha256=args.sha256))
    except DataError as e:
        return _fail(str(e))
    return 0


def _table(counts: dict, label_names: tuple[str, ...]) -> str:
    from metakd_ray.data.splits import SPLITS

    head = ["domain", "split", "n", *label_names]
    rows = [[d, s, str(c["n"]), *(str(c["labels"][n]) for n in label_names)]
            for d, per_split in counts.items() for s, c in per_split.items()]
    for s in SPLITS:
        per = [counts[d][s] for d in counts]
        totals = [sum(c["labels"][n] for c in per) for n in label_names]
        rows.append(["all", s, str(sum(c["n"] for c in per)), *map(str, totals)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(row: list[str]) -> str:  # names left-aligned, counts right-aligned
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(head), *(fmt(r) for r in rows)])


def _describe(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=f"{PROG} describe", description="Per domain and split: size and label counts.")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--json", action="store_true", help="print {domain: {split: {n, labels}}} as JSON only")
    ap.add_argument("--rate", help="count subsample(train, RATE, SEED) instead of train")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
    except config.ConfigError as e:
        for line in e.errors:
            _fail(f"{e.source}: {line}" if e.source else line)
        return 2
    rate = None
    if args.rate is not None:
        try:
            rate = float(args.rate)
        except ValueError:
            rate = float("nan")
        if not 0.0 < rate <= 1.0:  # as splits.check_rate; False for nan
            return _fail(f"--rate must be a number in (0, 1]; got {args.rate!r}")
    from metakd_ray.data.splits import label_counts, load_splits

    try:
        splits = load_splits(cfg.data)
    except DataError as e:
        return _fail(str(e))
    counts = label_counts(splits, rate=rate, seed=args.seed)
    if args.json:
        print(json.dumps(counts))
        return 0
    where = data_root(cfg.data)
    note = f"; train = subsample(rate={rate}, seed={args.seed})" if rate is not None else ""
    print(f"{cfg.data.dataset} from {where}: labels {', '.join(splits.label_names)}{note}")
    print(_table(counts, splits.label_names))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"fetch": _fetch, "describe": _describe}
    if not argv or argv[0] not in commands:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
            return 0
        return _fail(f"expected a command: {' or '.join(commands)} (see {PROG} --help)")
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
