"""Student pooling: BERT's [CLS] pooler (``model.pooling=cls``, the paper's pooled output) against the masked mean
(``mean``, the default), in the accuracy of a fine-tuned student on real Amazon data.

    python benchmarks/pooling.py [--target books] [--rates 0.1 1.0] [--seeds 0 1]

For each rate (0.1: the smoke's cell; 1.0: the full-data cell), seed and pooling: ``none/finetune`` (no teacher) of
the smoke's 3-layer student cut from the real all-MiniLM-L6-v2 (teacher layers 2, 4, 6), sweeps/smoke.yaml settings
(max_length 64, 2 epochs, lr 5e-5, batch 32, the preset's precision) with only ``model.pooling`` changed. The cell
is built and trained by ``metakd_ray.cell`` (``student_data``, ``build_student``, ``train_student``: what a sweep
trial and ``local.run_cell`` run; the prototype pass is skipped, finetune does not use it); the epoch is selected on
the target's dev split and scored on its test split. A ``cls`` student's pooler starts from the checkpoint's pooler
weights; every other weight starts the same for both poolings at a seed, and both see the same batches.
Mean and cls alternate run by run, so load from other processes hits both alike.

Prints a table and the mean test-accuracy difference (cls - mean) per rate; writes benchmarks/results/pooling.json
(after every run, so an interrupted run keeps what it measured). A full-data run takes 2-5 minutes on 2 shared CPUs in
fp32 (a rate-0.1 run 15-25 s): ``--budget-min`` (default 15) skips a rate's further seeds once their pair would end
past it, and the JSON lists what it skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import _env  # noqa: F401  (sets the environment before torch/transformers are imported)
from _env import REPO

import torch  # noqa: E402

from metakd_ray import cell as CELL  # noqa: E402
from metakd_ray import config as C  # noqa: E402
from metakd_ray import data as D  # noqa: E402
from metakd_ray import models as M  # noqa: E402
from metakd_ray.models.heads import checkpoint_pooler  # noqa: E402
from metakd_ray.runtime import runtime_for  # noqa: E402

POOLINGS = ("mean", "cls")
PRESET = "sweeps/smoke.yaml"
METHOD = "finetune"


def run_one(cfg: C.Config, data: CELL.StudentData, encoder, tokenizer, splits: D.Splits, target: str,
            seed: int) -> dict:
    """Fine-tune one student of ``cfg`` (its pooling) on ``data``; dev-selected epoch, test accuracy."""
    runtime = runtime_for(cfg.compute.precision)
    t0 = time.perf_counter()
    student = CELL.build_student(cfg, encoder, tokenizer, METHOD, splits.num_labels, len(splits.domains), None,
                                 seed=seed)
    run = CELL.train_student(cfg, data, student, METHOD, None, tokenizer=tokenizer, domains=splits.domains,
                             seed=seed, runtime=runtime)
    stage = run.stages[-1]
    return dict(test=run.test_accuracy[target], dev=stage.best_dev, best_epoch=stage.best_epoch,
                seconds=time.perf_counter() - t0, precision=runtime.precision, device=runtime.device.type)


def summarize(runs: list[dict], rates: list[float], seeds: list[int]) -> tuple[list[str], dict]:
    """The printed table and the per-rate summary, over the (rate, seed) pairs whose two runs are done."""
    lines = [f"{'rate':>5} {'seed':>4} {'n_train':>7} {'mean test':>9} {'cls test':>8} {'cls-mean':>8} "
             f"{'mean dev':>8} {'cls dev':>7} {'s mean':>6} {'s cls':>5}"]
    summary = {}
    for rate in rates:
        pairs = []
        for seed in seeds:
            found = [next((r for r in runs if (r["rate"], r["seed"], r["pooling"]) == (rate, seed, p)), None)
                     for p in POOLINGS]
            if None not in found:
                pairs.append(found)
        if not pairs:
            continue
        for m, c in pairs:
            lines.append(f"{rate:>5g} {m['seed']:>4} {m['n_train']:>7} {m['test']:>9.4f} {c['test']:>8.4f} "
                         f"{c['test'] - m['test']:>+8.4f} {m['dev']:>8.4f} {c['dev']:>7.4f} {m['seconds']:>6.0f} "
                         f"{c['seconds']:>5.0f}")
        diffs = [c["test"] - m["test"] for m, c in pairs]
        means = {p: statistics.mean(pair[i]["test"] for pair in pairs) for i, p in enumerate(POOLINGS)}
        n_test = pairs[0][0]["n_test"]
        # one run's binomial standard error at the mean accuracy: the resolution of a single test score
        se = math.sqrt(means["mean"] * (1 - means["mean"]) / n_test)
        summary[f"{rate:g}"] = dict(mean_test={p: round(v, 4) for p, v in means.items()},
                                    diff_cls_minus_mean=round(statistics.mean(diffs), 4),
                                    diffs=[round(d, 4) for d in diffs], seeds=[m["seed"] for m, _ in pairs],
                                    n_test=n_test, single_run_se=round(se, 4))
        lines.append(f"rate {rate:g}: mean test accuracy mean {means['mean']:.4f}, cls {means['cls']:.4f}; "
                     f"cls - mean = {statistics.mean(diffs):+.4f} over {len(diffs)} seed(s) "
                     f"(one test score's s.e. {se:.4f}, {n_test} test reviews)")
    return lines, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="books")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budget-min", type=float, default=15.0,
                    help="start no further seed of a rate once its last pair would end past this many minutes")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pooling.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    cfgs = {p: C.load(REPO / PRESET, [f"model.pooling={p}"]) for p in POOLINGS}
    base = cfgs["mean"]
    splits = D.load_splits(base.data)
    encoder, tokenizer = M.load_encoder(base.model.teacher, dropout=base.model.dropout)
    pretrained_pooler = checkpoint_pooler(encoder) is not None
    load_before, t_start = os.getloadavg(), time.perf_counter()
    runs: list[dict] = []
    skipped: list[dict] = []
    path = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(complete: bool) -> list[str]:
        lines, summary = summarize(runs, args.rates, args.seeds)
        out = dict(command="python benchmarks/pooling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   complete=complete, target=args.target, method=f"none/{METHOD}", preset=PRESET,
                   rates=args.rates, seeds=args.seeds, skipped_for_budget=skipped, pretrained_pooler=pretrained_pooler,
                   summary=summary, runs=runs, seconds=round(time.perf_counter() - t_start, 1),
                   machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__,
                                threads=torch.get_num_threads(), loadavg_before=load_before,
                                loadavg_after=os.getloadavg()))
        with open(path, "w") as f:
            f.write(json.dumps(out, indent=2) + "\n")
        return lines

    for rate in args.rates:
        last_pair = 0.0
        for seed in args.seeds:
            elapsed = time.perf_counter() - t_start
            if last_pair and elapsed + last_pair > args.budget_min * 60:
                skipped.append(dict(rate=rate, seed=seed))
                print(f"rate {rate:g} seed {seed}: skipped (would end past {args.budget_min:g} min)", file=sys.stderr)
                continue
            t_pair = time.perf_counter()
            data = CELL.student_data(base, splits, tokenizer, args.target, rate, seed, None)  # pooling-independent
            for pooling in POOLINGS:
                r = run_one(cfgs[pooling], data, encoder, tokenizer, splits, args.target, seed)
                r.update(rate=rate, seed=seed, pooling=pooling, n_train=len(data.train), n_dev=len(data.dev),
                         n_test=len(data.test))
                runs.append(r)
                write(complete=False)  # an interrupted run keeps what it measured
                print(f"rate {rate:g} seed {seed} {pooling:<4}: test {r['test']:.4f} dev {r['dev']:.4f} "
                      f"(epoch {r['best_epoch']}) {r['seconds']:.0f}s", file=sys.stderr, flush=True)
            last_pair = time.perf_counter() - t_pair

    lines = write(complete=True)
    print(f"{args.target}, none/finetune, 3-layer student from all-MiniLM-L6-v2 layers [2, 4, 6], {PRESET} settings; "
          f"cls pooler from the checkpoint: {pretrained_pooler}")
    print("\n".join(lines))
    print(f"{time.perf_counter() - t_start:.0f} s; wrote {os.path.relpath(path, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
