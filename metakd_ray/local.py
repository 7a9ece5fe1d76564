"""One sweep cell, end to end, in a single process with no Ray: data -> prototype scores -> teacher -> student
-> per-domain test accuracy. The reference for what the Ray stages distribute, and a quick real example::

    python -m metakd_ray.local sweeps/smoke.yaml --target books --method meta/meta_kd --rate 0.1

Artefacts go to ``<storage.root>/local/<target>-<teacher kind>-<student method>-r<rate>-s<seed>-<config hash>/`` with
the resolved config beside them; a rerun with the same config resumes every stage from its checkpoints, a changed
config (anything but ``ray``/``storage``) gets a directory of its own.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from torch import nn

from metakd_ray import cell as CELL
from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import models as M
from metakd_ray.distill import LiveTeacher
from metakd_ray.teacher.model import build_teacher, pool_prototype_scores, teacher_logits, train_teacher
from metakd_ray.runtime import runtime_for
from metakd_ray.storage import hash_json
from metakd_ray.training import LocalCheckpointer, accuracy_by_domain, atomic_export, set_seed


def run_cell(cfg: C.Config, target: str, method: str, rate: float, seed: int, out_dir: Path, *,
             splits: D.Splits | None = None, encoder: nn.Module | None = None, tokenizer: Any = None,
             log: Callable[[dict], None] | None = None) -> dict:
    """Train the teacher (unless ``finetune``) and the student of one cell; return per-domain test accuracies.
    ``splits``/``encoder``/``tokenizer`` may be passed in (tests use a tiny random encoder)."""
    kind, student_method = CELL.split_method(method)
    out_dir = Path(out_dir)
    C.write_resolved(cfg, out_dir)
    t0 = time.time()
    splits = splits or D.load_splits(cfg.data)
    if encoder is None:
        encoder, tokenizer = M.load_encoder(cfg.model.teacher, dropout=cfg.model.dropout)
    M.check_max_length(encoder, cfg.data.max_length)
    domains, collate = splits.domains, D.collator(tokenizer)
    runtime = runtime_for(cfg.compute.precision)  # this machine's GPU if it has one, else the CPU
    ids, scores = pool_prototype_scores(cfg, splits, encoder, tokenizer, kind, target, rate, seed, runtime)
    scores_by_id = dict(zip(ids, scores.tolist()))
    data = CELL.student_data(cfg, splits, tokenizer, target, rate, seed, scores_by_id)
    result: dict[str, Any] = {"target": target, "method": method, "rate": rate, "seed": seed,
                              "n_student_train": len(data.train), "device": runtime.device.type,
                              "precision": runtime.precision}
    seconds: dict[str, float] = {"prototypes": time.time() - t0}
    source = None
    if kind != "none":
        tdoms = CELL.teacher_domains(kind, target, domains, cfg.teacher.exclude_target)
        train, dev = CELL.teacher_sets(cfg, splits, tokenizer, tdoms, target, rate, seed, scores_by_id)
        # the teacher trains a copy: the student starts from the pre-trained encoder, not the fine-tuned one
        t1 = time.time()
        set_seed(seed)
        teacher = build_teacher(kind, copy.deepcopy(encoder), splits.num_labels, len(domains), cfg.model)
        teacher.to(runtime.device)
        tres = train_teacher(teacher, kind, CELL.loader(train, collate, cfg.teacher.batch_size, seed, cfg.compute),
                             CELL.eval_loader(dev, collate), cfg.teacher, num_domains=len(domains),
                             domain_names=domains, seed=seed, checkpointer=LocalCheckpointer(out_dir / "teacher"),
                             log=log, runtime=runtime)
        atomic_export(lambda d: teacher.save_pretrained(d, tokenizer), out_dir / "teacher" / "best")
        test = CELL.tokenize_splits(cfg, tokenizer, test=CELL.filter_domains(splits["test"], tdoms, domains))["test"]
        result.update(n_teacher_train=len(train), teacher_dev=tres.best_dev,
                      teacher_test=accuracy_by_domain(teacher, CELL.eval_loader(test, collate), domains,
                                                      teacher_logits, runtime=runtime))
        seconds["teacher"] = time.time() - t1
        g = M.student_layer_map(cfg.model, encoder.config.num_hidden_layers)
        source = LiveTeacher(teacher, g, dropout=cfg.distill.teacher_dropout)
    t2 = time.time()
    student = CELL.build_student(cfg, encoder, tokenizer, student_method, splits.num_labels, len(domains), source,
                                 seed=seed)
    run = CELL.train_student(cfg, data, student, student_method, source, tokenizer=tokenizer, domains=domains,
                             seed=seed, checkpoint_dir=out_dir / "student", log=log, runtime=runtime)
    seconds["student"] = time.time() - t2
    atomic_export(lambda d: student.save_pretrained(d, tokenizer), out_dir / "student" / "best")
    result["student_test"] = run.test_accuracy
    result["params"] = M.describe_models(encoder, student.encoder)
    result["seconds"] = time.time() - t0
    result["stage_seconds"] = seconds
    if runtime.device.type == "cuda":
        import torch

        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def cell_dir_name(cfg: C.Config, target: str, method: str, rate: float, seed: int) -> str:
    """``<target>-<kind>-<method>-r<rate>-s<seed>-<config hash>``: the hash covers every setting that changes what is
    computed (not ``ray``/``storage``), so a rerun with the same config resumes its checkpoints and a changed config
    gets its own directory instead of reusing a teacher or student trained under other settings."""
    kind, sm = method.split("/")
    what = {k: v for k, v in C.to_dict(cfg).items() if k not in ("ray", "storage")}
    return f"{target}-{kind}-{sm}-r{rate:g}-s{seed}-{hash_json(what)[:10]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metakd_ray.local", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--target", help="target domain (default: the first of sweep.target_domains or data.domains)")
    ap.add_argument("--method", default="meta/meta_kd", help=f"one of {', '.join(C.VALID_METHODS)}")
    ap.add_argument("--rate", type=float, default=None, help="sample rate (default: the first of sweep.sample_rates)")
    ap.add_argument("--seed", type=int, default=None, help="seed (default: the first of sweep.seeds)")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = C.load(args.config, args.overrides)
        target = args.target or (cfg.sweep.target_domains or cfg.data.domains)[0]
        if target not in cfg.data.domains:
            raise C.ConfigError([f"--target: {target!r} is not in data.domains ({', '.join(cfg.data.domains)})"])
        rate = args.rate if args.rate is not None else cfg.sweep.sample_rates[0]
        D.check_rate(rate)
        CELL.split_method(args.method)
    except (C.ConfigError, ValueError) as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else cfg.sweep.seeds[0]
    out = Path(cfg.storage.root) / "local" / cell_dir_name(cfg, target, args.method, rate, seed)
    try:
        res = run_cell(cfg, target, args.method, rate, seed, out,
                       log=lambda m: print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                       for k, v in m.items()}), flush=True))
    except (D.DataError, M.ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{args.method} on {target}, rate {rate:g}, seed {seed}: "
          f"{res.get('n_teacher_train', 0)} teacher / {res['n_student_train']} student training examples")
    if "teacher_test" in res:
        print("teacher test accuracy: " + ", ".join(f"{d} {a:.4f}" for d, a in res["teacher_test"].items()))
    print("student test accuracy: " + ", ".join(f"{d} {a:.4f}" for d, a in res["student_test"].items()))
    p = res["params"]
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["stage_seconds"].items())
          + f"; {res['precision']} on {res['device']}"
          + (f"; peak GPU memory {res['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in res else ""))
    print(f"student {p['student']['params']:,} params, teacher {p['teacher']['params']:,}: "
          f"{p['compression_ratio']:.2f}x smaller; {res['seconds']:.0f} s; artefacts in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
