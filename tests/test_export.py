"""Exported students (``metakd_ray.export``) load in plain ``transformers`` and predict what the Student predicts;
``python -m metakd_ray.predict`` runs them.

Students are built as ``cell.build_student`` builds them (a meta_kd student, so W_h, the domain head and W_d exist
and must be left out), from the tiny random BERT of ``tests/toy.py``, with perturbed classifier weights so the
logits are far from zero. Loading is checked in a subprocess that cannot import metakd_ray (an import blocker,
then ``'metakd_ray' not in sys.modules``); every subprocess gets its own ``HF_MODULES_CACHE`` under tmp_path.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from toy import NO_METAKD, tiny_config, toy_tokenizer

from metakd_ray import cell as CELL
from metakd_ray import models as M
from metakd_ray import predict as P
from metakd_ray.export import AUTO_MAP, METADATA_FILE, MODELING_FILE, export_student
from metakd_ray.hf_student import modeling_metakd

SENTIMENT = ("negative", "positive")
NLI = ("entailment", "neutral", "contradiction")
TEXTS = ["good alpha1 beta2", "awful", "fine gamma3 gamma4 alpha0 beta1 bad", "zzz unknown good", ""]
PAIRS = [("good alpha1", "bad beta2"), ("awful gamma0 gamma1", "fine"), ("beta3", "alpha4 alpha5 good fine awful")]
MAX_LENGTH = 16  # the training data.max_length (tiny_config); the encoder has 32 positions


@dataclass(frozen=True)
class FakeTeacher:
    """What ``build_student`` reads from a teacher source: a meta teacher's widths and a layer map for 1 layer."""

    kind: str = "live"
    layer_map: tuple[int, ...] = (0, 2)
    hidden_size: int = 48
    domain_hidden_size: int | None = 40


def make_student(tmp: Path, pooling: str, labels: tuple[str, ...], seed: int) -> M.Student:
    cfg = tiny_config(tmp, f"model.pooling={pooling}", "model.dropout=0.1")
    tok = toy_tokenizer()
    encoder = M.random_encoder(vocab_size=len(tok), max_position=32, dropout=0.1, seed=seed)
    student = CELL.build_student(cfg, encoder, tok, "meta_kd", len(labels), 3, FakeTeacher(), seed=seed)
    assert student.pooling == pooling and student.W_h is not None and student.domain_head is not None
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        student.classifier.weight.copy_(torch.randn(student.classifier.weight.shape, generator=g) * 2.0)
        student.classifier.bias.copy_(torch.randn(student.classifier.bias.shape, generator=g))
    return student


def student_logits(student: M.Student, tok, texts, pairs=None, max_length=MAX_LENGTH) -> tuple[list, list]:
    """(input_ids, logits) of one padded batch, the Student in eval mode, as the export tokenizes."""
    enc = tok(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    student.eval()
    with torch.no_grad():
        out = student(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"),
                      domain_ids=torch.zeros(len(texts), dtype=torch.long))
    return enc["input_ids"].tolist(), out.logits.tolist()


def hf_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "hf_modules"),
            "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """Two exports — mean pooling (sentiment labels) and reference pooling (NLI labels) — with their Students."""
    root = tmp_path_factory.mktemp("exports")
    tok = toy_tokenizer()
    out = {}
    for pooling, labels, seed in (("mean", SENTIMENT, 0), ("reference", NLI, 1)):
        student = make_student(root, pooling, labels, seed)
        path = export_student(student, tok, root / f"student-{pooling}", labels, max_length=MAX_LENGTH,
                              extra_metadata={"target": "beta", "method": "meta/meta_kd", "seed": seed})
        out[pooling] = dict(student=student, path=path, labels=labels)
    out["tok"], out["root"] = tok, root
    return out


# ----------------------------------------------------------------------------------------------------------
# The folder
# ----------------------------------------------------------------------------------------------------------


def test_export_layout_and_metadata(exports):
    from safetensors import safe_open

    for pooling in ("mean", "reference"):
        d, labels = exports[pooling]["path"], exports[pooling]["labels"]
        names = {p.name for p in d.iterdir()}
        assert {"config.json", MODELING_FILE, "model.safetensors", "tokenizer_config.json", METADATA_FILE} <= names
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["auto_map"] == AUTO_MAP and cfg["metakd_pooling"] == pooling
        assert cfg["id2label"] == {str(i): n for i, n in enumerate(labels)}
        assert cfg["label2id"] == {n: i for i, n in enumerate(labels)}
        meta = json.loads((d / METADATA_FILE).read_text())
        code = (d / MODELING_FILE).read_text()
        assert code == Path(modeling_metakd.__file__).read_text()
        assert "metakd_ray" not in "".join(s for s in code.splitlines() if s.startswith(("import", "from")))
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert keys and all(k.startswith(("encoder.", "classifier.")) for k in keys), sorted(keys)
        assert not any(k.startswith("encoder.pooler") for k in keys)
        assert cfg["encoder_config"]["model_type"] == "bert" and meta["format"] == 2
        assert meta["label_names"] == list(labels) and meta["pooling"] == pooling
        assert meta["max_length"] == MAX_LENGTH
        assert json.loads((d / "tokenizer_config.json").read_text())["model_max_length"] == MAX_LENGTH
        assert meta["source"]["method"] == "meta/meta_kd"
        assert set(meta["versions"]) >= {"transformers", "torch"}
        student = exports[pooling]["student"]
        trained = sum(p.numel() for n, p in student.named_parameters()
                      if n.startswith(("encoder.", "classifier.")))
        assert meta["parameters"] == trained < sum(p.numel() for p in student.parameters())


def test_export_rejects_wrong_label_names(exports, tmp_path):
    with pytest.raises(ValueError, match="label names"):
        export_student(exports["mean"]["student"], exports["tok"], tmp_path / "x", ("only-one",))
    with pytest.raises(ValueError, match="distinct"):
        export_student(exports["mean"]["student"], exports["tok"], tmp_path / "x", ("a", "a"))
    with pytest.raises(TypeError, match="Student"):
        export_student(M.ClassifierTeacher(M.random_encoder(vocab_size=33, seed=0), 2), exports["tok"], tmp_path / "x",
                       SENTIMENT)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------
# Plain transformers, in a process without metakd_ray
# ----------------------------------------------------------------------------------------------------------

LOADER = NO_METAKD + r'''
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

cases, results = json.load(open(sys.argv[1])), []
for case in cases:
    tok = AutoTokenizer.from_pretrained(case["dir"], trust_remote_code=True)
    plain = AutoTokenizer.from_pretrained(case["dir"])  # works too (after a stdin question, EOF here)
    assert plain(case["texts"], case["pairs"])["input_ids"] == tok(case["texts"], case["pairs"])["input_ids"]
    model = AutoModelForSequenceClassification.from_pretrained(case["dir"], trust_remote_code=True).eval()
    pairs = case["pairs"]
    enc = tok(case["texts"], pairs, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    pipe = pipeline("text-classification", model=case["dir"], trust_remote_code=True)
    inputs = case["texts"] if pairs is None else [{"text": a, "text_pair": b} for a, b in zip(case["texts"], pairs)]
    results.append(dict(cls=type(model).__name__, id2label={str(k): v for k, v in model.config.id2label.items()},
                        input_ids=enc["input_ids"].tolist(), logits=logits.tolist(),
                        pipeline=[r[0] if isinstance(r, list) else r for r in map(pipe, inputs)]))
assert "metakd_ray" not in sys.modules, sorted(m for m in sys.modules if m.startswith("metakd_ray"))
json.dump(results, open(sys.argv[2], "w"))
'''


def test_plain_transformers_gives_the_students_logits(exports, tmp_path):
    tok, cases, expected = exports["tok"], [], []
    for pooling in ("mean", "reference"):
        student = exports[pooling]["student"]
        for texts, pairs in ((TEXTS, None), ([a for a, _ in PAIRS], [b for _, b in PAIRS])):
            ids, logits = student_logits(student, tok, texts, pairs)
            # the pipeline runs one input at a time (no padding): with reference pooling that differs from a batch
            single = [student_logits(student, tok, [t], None if pairs is None else [pairs[i]])[1][0]
                      for i, t in enumerate(texts)]
            cases.append(dict(dir=str(exports[pooling]["path"]), texts=texts, pairs=pairs))
            expected.append(dict(labels=exports[pooling]["labels"], input_ids=ids, logits=logits, single=single))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "loader.py").write_text(LOADER)
    run = subprocess.run([sys.executable, str(tmp_path / "loader.py"), str(tmp_path / "cases.json"),
                          str(tmp_path / "out.json")], cwd=tmp_path, env=hf_env(tmp_path), capture_output=True,
                         stdin=subprocess.DEVNULL, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    worst = 0.0
    for exp, got in zip(expected, json.loads((tmp_path / "out.json").read_text())):
        assert got["cls"] == "MetaKDStudentForSequenceClassification"
        assert got["id2label"] == {str(i): n for i, n in enumerate(exp["labels"])}
        assert got["input_ids"] == exp["input_ids"]
        diff = (torch.tensor(got["logits"]) - torch.tensor(exp["logits"])).abs().max().item()
        assert diff <= 1e-5, diff
        worst = max(worst, diff)
        assert torch.tensor(exp["logits"]).abs().max() > 0.5  # non-trivial logits
        for single, pred in zip(exp["single"], got["pipeline"]):
            probs = torch.softmax(torch.tensor(single), dim=-1)
            assert pred["label"] == exp["labels"][int(probs.argmax())]
            assert abs(pred["score"] - probs.max().item()) <= 1e-5
    print(f"max |logits(HF) - logits(Student)| = {worst:.2e}")


def test_minilm_student_round_trip(tmp_path):
    """A student cut from the real default teacher (all-MiniLM-L6-v2, 3 of its 6 layers) with its real tokenizer:
    the saved config and weights rebuild the same classifier (same code file as the export's copy)."""
    encoder, tok = M.load_encoder("default")
    cfg = tiny_config(tmp_path, "data.max_length=64", "model.student.num_layers=3", "model.dropout=0.1")
    teacher = FakeTeacher(layer_map=(0, 2, 4, 6), hidden_size=384, domain_hidden_size=384)
    student = CELL.build_student(cfg, encoder, tok, "meta_kd", 3, 3, teacher, seed=0)
    with torch.no_grad():
        student.classifier.weight.mul_(100.0)
    path = export_student(student, tok, tmp_path / "minilm", NLI, max_length=64)
    model = modeling_metakd.MetaKDStudentForSequenceClassification.from_pretrained(path).eval()
    assert model.encoder.config.num_hidden_layers == 3 and model.encoder.config.metakd_teacher_layers == [2, 4, 6]
    premises = ["A man inspects the uniform of a figure in some East Asian country.", "Two dogs run."]
    hypotheses = ["The man is sleeping.", "Animals are moving outside in the park today."]
    _, expected = student_logits(student, tok, premises, hypotheses, max_length=64)
    enc = tok(premises, hypotheses, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert (enc["token_type_ids"] == 1).any() and (enc["attention_mask"] == 0).any()  # pairs, padded
    with torch.no_grad():
        got = model(**enc).logits
    diff = (got - torch.tensor(expected)).abs().max().item()
    assert diff <= 1e-5, diff
    assert torch.tensor(expected).abs().max() > 0.05
    print(f"MiniLM student: max |logits(HF) - logits(Student)| = {diff:.2e}")


def test_reference_pooling_depends_on_padding_as_in_training(exports):
    """Guards the copied semantics: 'reference' averages padding in, 'mean' does not."""
    tok = exports["tok"]
    for pooling, same in (("mean", True), ("reference", False)):
        student = exports[pooling]["student"]
        alone = torch.tensor(student_logits(student, tok, ["awful"])[1][0])
        padded = torch.tensor(student_logits(student, tok, ["awful", TEXTS[2]])[1][0])
        assert torch.allclose(alone, padded, atol=1e-5) is same


# ----------------------------------------------------------------------------------------------------------
# python -m metakd_ray.predict
# ----------------------------------------------------------------------------------------------------------


def run_predict(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metakd_ray.predict", *map(str, args)], env=hf_env(tmp),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


def check_lines(stdout: str, labels: tuple[str, ...], expected_logits: list, ids: list | None = None) -> None:
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert len(lines) == len(expected_logits)
    for i, (line, logits) in enumerate(zip(lines, expected_logits)):
        probs = torch.softmax(torch.tensor(logits), dim=-1)
        assert list(line["probabilities"]) == list(labels)
        assert abs(sum(line["probabilities"].values()) - 1.0) <= 1e-6
        assert torch.allclose(torch.tensor(list(line["probabilities"].values())), probs, atol=1e-5)
        assert line["label"] == labels[int(probs.argmax())]
        assert ("id" in line) is (ids is not None) and (ids is None or line["id"] == ids[i])


def test_predict_texts(exports, tmp_path):
    e = exports["mean"]
    long_text = " ".join(["good", "alpha1"] * 30)  # 60 words: truncated at the export's max_length
    texts = [*TEXTS[:4], long_text]
    run = run_predict(tmp_path, e["path"], *[a for t in texts for a in ("--text", t)], "--batch-size", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    check_lines(run.stdout, SENTIMENT, student_logits(e["student"], exports["tok"], texts)[1])


def test_predict_jsonl_pairs_and_csv(exports, tmp_path):
    tok = exports["tok"]
    ref = exports["reference"]  # one batch holding every row: the same padding as the expected logits
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "text": a, "text_pair": b}) + "\n"
                                               for i, (a, b) in enumerate(PAIRS)) + "\n")
    run = run_predict(tmp_path, ref["path"], "--file", tmp_path / "in.jsonl", "--batch-size", "8")
    assert run.returncode == 0, run.stderr[-3000:]
    expected = student_logits(ref["student"], tok, [a for a, _ in PAIRS], [b for _, b in PAIRS])[1]
    check_lines(run.stdout, NLI, expected, ids=list(range(len(PAIRS))))

    mean = exports["mean"]
    with open(tmp_path / "in.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        w.writerows([f"r{i}", t, 0] for i, t in enumerate(TEXTS[:4]))
    run = run_predict(tmp_path, mean["path"], "--file", tmp_path / "in.csv", "--batch-size", "3")
    assert run.returncode == 0, run.stderr[-3000:]
    check_lines(run.stdout, SENTIMENT, student_logits(mean["student"], tok, TEXTS[:4])[1],
                ids=[f"r{i}" for i in range(4)])


def test_read_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first text\n\n  second  \n")
    assert [r.text for r in P.read_file(tmp_path / "a.txt")] == ["first text", "  second  "]
    (tmp_path / "b.jsonl").write_text('{"text": "x", "text_pair": ""}\n{"text": "y", "text_pair": "z"}\n')
    assert [(r.text, r.text_pair) for r in P.read_file(tmp_path / "b.jsonl")] == [("x", ""), ("y", "z")]
    (tmp_path / "c.jsonl").write_text('{"text": "x", "text_pair": ""}\n')  # no pair anywhere: single texts
    assert [(r.text, r.text_pair, r.id) for r in P.read_file(tmp_path / "c.jsonl")] == [("x", None, None)]
    (tmp_path / "d.csv").write_text("premise,hypothesis\np,h\n")
    with pytest.raises(P.InputError, match="'text'"):
        P.read_file(tmp_path / "d.csv", "hypothesis")


def _one_error_line(run: subprocess.CompletedProcess, where: object) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert run.stdout == "" and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {where}: ") and "expected" in lines[0], run.stderr
    return lines[0]


def test_predict_bad_input_missing_column(exports, tmp_path):
    d = exports["mean"]["path"]
    (tmp_path / "no_text.csv").write_text("id,sentence\n1,good\n")
    line = _one_error_line(run_predict(tmp_path, d, "--file", tmp_path / "no_text.csv"), tmp_path / "no_text.csv")
    assert "'text'" in line
    (tmp_path / "no_text.jsonl").write_text('{"text": "good"}\n{"sentence": "bad"}\n')
    line = _one_error_line(run_predict(tmp_path, d, "--file", tmp_path / "no_text.jsonl"), tmp_path / "no_text.jsonl")
    assert "line 2" in line
    (tmp_path / "pairs.jsonl").write_text('{"text": "good"}\n')
    _one_error_line(run_predict(tmp_path, d, "--file", tmp_path / "pairs.jsonl", "--text-pair-column", "hyp"),
                    tmp_path / "pairs.jsonl")


def test_predict_bad_input_not_an_export(exports, tmp_path):
    # the training format (Student.save_pretrained) is not an export, nor is an empty or missing folder
    exports["mean"]["student"].save_pretrained(tmp_path / "training-format", exports["tok"])
    for d in (tmp_path / "training-format", tmp_path / "nothing-here"):
        _one_error_line(run_predict(tmp_path, d, "--text", "good"), d)
    broken = tmp_path / "broken"  # looks like an export but cannot load: still one line
    broken.mkdir()
    for name in ("config.json", METADATA_FILE):
        (broken / name).write_text((exports["mean"]["path"] / name).read_text())
    _one_error_line(run_predict(tmp_path, broken, "--text", "good"), broken)


def test_predict_bad_input_unreadable_file(exports, tmp_path):
    d = exports["mean"]["path"]
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 \xff\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    for f in (tmp_path / "missing.jsonl", tmp_path / "dir.jsonl", tmp_path / "latin1.txt", tmp_path / "bad.jsonl",
              tmp_path / "data.parquet"):
        _one_error_line(run_predict(tmp_path, d, "--file", f), f)


# ----------------------------------------------------------------------------------------------------------
# Atomic export
# ----------------------------------------------------------------------------------------------------------


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_is_atomic(exports, tmp_path, monkeypatch):
    student, tok = exports["mean"]["student"], exports["tok"]
    target = export_student(student, tok, tmp_path / "best", SENTIMENT)
    before = _snapshot(target)

    def broken_save(self, directory, *args, **kwargs):
        (Path(directory) / "config.json").write_text("{}")  # a partial write, then the failure
        raise RuntimeError("disk full")

    monkeypatch.setattr(modeling_metakd.MetaKDStudentForSequenceClassification, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        export_student(student, tok, target, SENTIMENT)
    assert _snapshot(target) == before  # the older export is intact
    with pytest.raises(RuntimeError, match="disk full"):
        export_student(student, tok, tmp_path / "fresh", SENTIMENT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no partial or temporary folder left
