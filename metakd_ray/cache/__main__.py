"""``python -m metakd_ray.cache CONFIG [key=value ...] --teacher-dir DIR [--target D --rate R --seed S]``: build (or
find and verify) the teacher-output cache one cell needs, from an exported teacher; prints it as JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from metakd_ray import cell
from metakd_ray import config as C
from metakd_ray import data as D
from metakd_ray import models as M
from metakd_ray.cache.build import ensure_cache
from metakd_ray.cache.format import ATTENTION_MODES, PRECISIONS
from metakd_ray.cache.job import live_only
from metakd_ray.cache.store import CacheError
from metakd_ray.models.families import config_value
from metakd_ray.raycluster import connect_ray
from metakd_ray.storage import Storage
from metakd_ray.teacher.artefact import (MODEL_DIR, PROTOTYPE_FILE, TeacherNotFound, read_prototype_scores,
                                         resolve_teacher)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metakd_ray.cache", description=__doc__.split(":", 1)[1].strip())
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--teacher-dir", required=True,
                    help="an exported teacher (encoder/, heads.pt, heads.json): a directory, a path under "
                         "storage.root, or a teacher key (teachers/<key>/model)")
    ap.add_argument("--target", help="target domain (default: the first of sweep.target_domains or data.domains)")
    ap.add_argument("--rate", type=float, default=None, help="sample rate (default: the first of sweep.sample_rates)")
    ap.add_argument("--seed", type=int, default=None, help="seed (default: the first of sweep.seeds)")
    ap.add_argument("--split", default="train", choices=("train", "dev", "test"))
    ap.add_argument("--prototype-scores", help="parquet with columns id, prototype_score (default: "
                    "prototype_scores.parquet beside the teacher's model/ folder, if there)")
    ap.add_argument("--precision", default="float16", choices=PRECISIONS)
    ap.add_argument("--attention", default="inputs", choices=ATTENTION_MODES)
    ap.add_argument("--max-total-gb", type=float, default=None, help="evict LRU caches beyond this total")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = C.load(args.config, args.overrides)
        target = args.target or (cfg.sweep.target_domains or cfg.data.domains)[0]
        if target not in cfg.data.domains:
            raise C.ConfigError([f"--target: {target!r} is not in data.domains ({', '.join(cfg.data.domains)})"])
        rate = D.check_rate(args.rate if args.rate is not None else cfg.sweep.sample_rates[0])
        seed = args.seed if args.seed is not None else cfg.sweep.seeds[0]
        storage = Storage(cfg.storage.root)
        loc = resolve_teacher(storage, args.teacher_dir)
    except (C.ConfigError, ValueError, CacheError, TeacherNotFound) as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    with loc.storage().local_copy(*loc.parts) as tdir:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(tdir) / "encoder"))
        enc_cfg = json.loads((Path(tdir) / "encoder" / "config.json").read_text())
        if why := live_only(enc_cfg.get("model_type")):
            print(f"error: --teacher-dir {args.teacher_dir}: no cache: {why}; its trials run it live",
                  file=sys.stderr)
            return 2
        n_layers = config_value(enc_cfg, "num_hidden_layers")  # DistilBERT saves n_layers
        proto_path = args.prototype_scores
        if proto_path is None and loc.parts and loc.parts[-1] == MODEL_DIR and \
                loc.storage().is_file(*loc.parts[:-1], PROTOTYPE_FILE):
            protos = read_prototype_scores(loc.storage(), *loc.parts[:-1], PROTOTYPE_FILE)
        elif proto_path:
            protos = read_prototype_scores(Storage(str(Path(proto_path).parent)), Path(proto_path).name)
        else:
            protos = None
    splits = D.load_splits(cfg.data)
    ds = cell.training_pool(cfg, splits, target, rate, seed) if args.split == "train" else splits[args.split]
    tok = cell.tokenize_splits(cfg, tokenizer, rows=cell.filter_domains(ds, (target,), splits.domains))["rows"]
    g = M.student_layer_map(cfg.model, n_layers)
    connect_ray(cfg)
    ref = ensure_cache(cfg, storage, args.teacher_dir, target, tok, g, protos, split=args.split,
                       tokenizer=tokenizer, precision=args.precision, attention=args.attention,
                       max_total_bytes=args.max_total_gb * 1e9 if args.max_total_gb else None)
    m = ref.manifest
    print(json.dumps({"cache": ref.storage().uri(*ref.parts), "built": ref.built, "examples": ref.num_examples,
                      "layer_map": m["layer_map"], "stored_layers": m["stored_layers"],
                      "bytes": ref.total_bytes, "kb_per_example": round(ref.total_bytes / ref.num_examples / 1e3, 1),
                      "build_seconds": m["build_seconds"] if ref.built else 0.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
