"""Bad input is refused before any compute, by the one preflight pass (``metakd_ray.preflight``) that
``python -m metakd_ray.config validate``, ``python -m metakd_ray.sweep CONFIG --dry-run`` and the run share.

Each case of the table runs a real CLI (in-process, or as a subprocess) on the toy project (``tests/toy.py``: a tiny
CSV corpus and a tiny BERT) with one thing wrong, and checks: exit code 2; exactly one ``error:`` line, naming the
setting or file and what is allowed; no traceback; nothing created or changed under ``tmp_path`` (where
``storage.root`` points) or in the project.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import toy

from metakd_ray import config as C
from metakd_ray import preflight
from metakd_ray.config.cli import main as config_main
from metakd_ray.sweep.__main__ import main as sweep_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return toy.write_toy_project(tmp_path_factory.mktemp("preflight-project")).parent


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``roots`` (directories too: a created child changes its directory's mtime) -> size, mtime."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


# -- setups: make the bad input under tmp_path, return extra overrides -------------------------------------------


def unwritable_root(tmp: Path, project: Path, mp) -> list[str]:
    if os.geteuid() == 0:  # root writes anywhere: use a root that cannot be created instead
        (tmp / "blocker").write_text("not a directory")
        return [f"storage.root={tmp / 'blocker' / 'store'}"]
    ro = tmp / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    return [f"storage.root={ro / 'store'}"]


def root_under_a_file(tmp: Path, project: Path, mp) -> list[str]:
    (tmp / "file.txt").write_text("x")
    return [f"storage.root={tmp / 'file.txt' / 'store'}"]


def root_is_a_file(tmp: Path, project: Path, mp) -> list[str]:
    (tmp / "store").write_text("x")
    return []


def gpt2_teacher(tmp: Path, project: Path, mp) -> list[str]:
    from transformers import GPT2Config

    from metakd_ray.models import default_teacher_path

    d = tmp / "gpt2"
    GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=64, vocab_size=30522, bos_token_id=0, eos_token_id=0).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(default_teacher_path() / name, d / name)
    return [f"model.teacher={d}"]


def small_vocab_teacher(tmp: Path, project: Path, mp) -> list[str]:
    d = tmp / "model"
    shutil.copytree(project / "model", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 20  # the toy tokenizer has 33 tokens
    (d / "config.json").write_text(json.dumps(cfg))
    return [f"model.teacher={d}"]


def corpus_without(tmp: Path, project: Path, split: str, drop) -> list[str]:
    d = tmp / "corpus"
    shutil.copytree(project / "corpus", d)
    with open(d / f"{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(d / f"{split}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if not drop(r))
    return [f"data.root={d}"]


def dev_without_a_class(tmp: Path, project: Path, mp) -> list[str]:
    return corpus_without(tmp, project, "dev", lambda r: r["domain"] == "beta" and r["label"] == "1")


def no_gamma_in_test(tmp: Path, project: Path, mp) -> list[str]:
    return corpus_without(tmp, project, "test", lambda r: r["domain"] == "gamma")


def rate_drops_a_class(tmp: Path, project: Path, mp) -> list[str]:
    """Today's subsample keeps at least one row per (domain, class), so no rate can empty a class; this case stands
    in a rule without that floor (round(rate * n) rows, possibly 0) to show the check reports it."""
    from metakd_ray.data import splits as S

    real = S.subsample_indices

    def no_floor(domains, labels, ids, rate, seed, only_domains=None):
        sizes = Counter(zip(domains, labels))
        only = None if only_domains is None else set(only_domains)
        return [i for i in real(domains, labels, ids, rate, seed, only_domains)
                if (only is not None and domains[i] not in only)
                or math.floor(rate * sizes[(domains[i], labels[i])] + 0.5) > 0]

    mp.setattr(S, "subsample_indices", no_floor)
    return ["sweep.sample_rates=[0.01, 1.0]", "sweep.seeds=[3]", "sweep.methods=[single/tinybert_kd]"]


# -- the table --------------------------------------------------------------------------------------------------

CASES = [
    # (cli, overrides, setup, substrings the one error line must contain)
    pytest.param("validate", ["name=../../x"], None, ["name: '../../x' is not allowed", "[A-Za-z0-9][A-Za-z0-9._-]*"],
                 id="name-parent-escape"),
    pytest.param("sweep", ["name=runs/x"], None, ["name: 'runs/x' is not allowed", "[A-Za-z0-9][A-Za-z0-9._-]*"],
                 id="name-with-slash"),
    pytest.param("sweep", ["name=.hidden"], None, ["name: '.hidden'", "[A-Za-z0-9][A-Za-z0-9._-]*"],
                 id="name-leading-dot"),
    pytest.param("validate", ["name="], None, ["name: '' is not allowed", "1-100 characters"], id="name-empty"),
    pytest.param("sweep", [], unwritable_root, ["storage.root: ", "cannot be created", "allowed: a path under"],
                 id="root-not-writable"),
    pytest.param("validate", [], root_under_a_file, ["storage.root: ", "file.txt is a file, not a directory",
                                                     "allowed"], id="root-parent-is-a-file"),
    pytest.param("sweep", [], root_is_a_file, ["storage.root: ", "store is a file, not a directory", "allowed"],
                 id="root-is-a-file"),
    pytest.param("sweep", ["storage.root=nosuchfs://bucket/x"], None,
                 ["storage.root: nosuchfs://bucket/x cannot be opened", "allowed: a local path or a pyarrow.fs URI"],
                 id="root-unknown-uri-scheme"),
    pytest.param("validate", ["data.root={tmp}/nodata"], None,
                 ["data.table.train: ", "nodata/train.csv does not exist"],
                 id="table-data-root-missing"),
    pytest.param("sweep", [], dev_without_a_class, ["data.table.dev 'dev.csv': domain 'beta' has no '1' rows",
                                                    "allowed: every class (0, 1)"], id="class-missing-from-dev"),
    pytest.param("validate", [], no_gamma_in_test, ["data.domains: gamma has no rows in the test split"],
                 id="domain-missing-from-test"),
    pytest.param("sweep", [], rate_drops_a_class,
                 ["sweep.sample_rates: rate 0.01 with seed 3 leaves domain 'beta' no '0', '1' training rows",
                  "allowed: rates that keep every class"], id="rate-so-small-a-class-vanishes"),
    pytest.param("sweep", ["model.student.layers=[3]"], None,
                 ["model.student.layers: [3] is not allowed", "in 1..2", "has 2 layers"], id="student-layer-too-deep"),
    pytest.param("validate", ["model.student.num_layers=4"], None,
                 ["model.student.num_layers: 4 is not allowed", "1..2 layers"], id="student-deeper-than-teacher"),
    pytest.param("sweep", ["model.student.source=random", "model.student.hidden_size=32",
                           "model.student.num_attention_heads=2", "model.student.intermediate_size=37"], None,
                 ["model.student.num_attention_heads: the student has 2 attention heads", "allowed: 4 heads"],
                 id="attention-heads-differ"),
    pytest.param("validate", [], gpt2_teacher, ["model.teacher: ", "is a 'gpt2' model",
                                                "allowed families: bert, roberta"], id="gpt2-teacher"),
    pytest.param("sweep", [], small_vocab_teacher, ["model.teacher: the tokenizer", "33 tokens", "vocab_size is 20",
                                                    "allowed"], id="tokenizer-larger-than-vocab"),
    pytest.param("sweep", ["model.teacher={tmp}/no-such-model"], None,
                 ["model.teacher: ", "no such directory", "allowed: 'default', a local model directory"],
                 id="teacher-directory-missing"),
    pytest.param("validate", ["data.max_length=64"], None, ["data.max_length: 64 exceeds the 32 position",
                                                            "allowed: data.max_length <= 32"],
                 id="max-length-beyond-positions"),
    pytest.param("sweep", ["data.domains=[alpha]", "sweep.target_domains=[alpha]", "sweep.methods=[meta/meta_kd]"],
                 None, ["sweep.methods: meta/meta_kd needs at least 2 domains", "data.domains is ['alpha']",
                        "allowed: 2 or more"], id="meta-teacher-one-domain"),
    pytest.param("validate", ["distill.gama2=0.2"], None, ["distill.gama2: unknown key", "did you mean"],
                 id="unknown-key"),
    pytest.param("sweep", ["teacher.epochs=many"], None, ["teacher.epochs: 'many' (str) is not allowed",
                                                          "expected an integer"], id="wrong-type"),
    pytest.param("validate", ["storage.root=s3://AKIAEXAMPLE:secret@bucket/metakd"], None,
                 ["storage.root: credentials in the URI are not allowed", "in the environment"],
                 id="security-credentials-in-uri"),
    pytest.param("sweep", ["storage.root=s3://bucket/metakd?access_key=A&secret_key=B"], None,
                 ["storage.root: credentials in the URI are not allowed", "AWS_SECRET_ACCESS_KEY"],
                 id="security-credentials-in-query"),
    # 192.0.2.1 (TEST-NET-1) is never routed: refused or silent. (10.255.255.1 is not safe everywhere: a sandbox's
    # transparent proxy accepted TCP connections to it.)
    pytest.param("sweep", ["ray.address=192.0.2.1:6379"], None,
                 ["ray.address: 192.0.2.1:6379 is not reachable within 3 s", "allowed: host:port"],
                 id="ray-address-unreachable", marks=pytest.mark.timeout(30)),
    pytest.param("sweep", ["ray.address=ray://:10001"], None, ["ray.address: 'ray://:10001' is not an address",
                                                               "allowed: host:port"], id="ray-address-malformed"),
    pytest.param("sweep-subprocess", ["name=../../x"], None, ["name: '../../x' is not allowed",
                                                              "[A-Za-z0-9][A-Za-z0-9._-]*"],
                 id="subprocess-sweep-name-escape"),
    pytest.param("validate-subprocess", ["data.dataset=amazon", "data.domains=[books, dvd]",
                                         "sweep.target_domains=[books]", "data.root={tmp}/nodata"], None,
                 ["Amazon reviews not found", "nodata", "get them with: python -m metakd_ray.data fetch amazon"],
                 id="subprocess-validate-amazon-missing"),
]


def run_cli(cli: str, config: Path, overrides: list[str], capsys) -> tuple[int, str, str]:
    if cli.endswith("-subprocess"):
        module = "metakd_ray.sweep" if cli.startswith("sweep") else "metakd_ray.config"
        args = [str(config), *overrides, "--dry-run"] if module == "metakd_ray.sweep" else [
            "validate", str(config), *overrides]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("RAY_ADDRESS", None)
        r = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
        return r.returncode, r.stdout, r.stderr
    if cli == "sweep":
        rc = sweep_main([str(config), *overrides, "--dry-run"])
    else:
        rc = config_main(["validate", str(config), *overrides])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("cli, overrides, setup, expected", CASES)
def test_bad_input_is_refused_with_one_line(cli, overrides, setup, expected, project, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    extra = setup(tmp_path, project, monkeypatch) if setup else []
    args = [f"storage.root={tmp_path / 'store'}", *extra, *(o.replace("{tmp}", str(tmp_path)) for o in overrides)]
    before = snapshot(tmp_path, project)
    start = time.monotonic()
    rc, out, err = run_cli(cli, project / "sweep.yaml", args, capsys)
    elapsed = time.monotonic() - start
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2, (out, err)
    assert len(errors) == 1, err
    assert all(s in errors[0] for s in expected), f"{errors[0]!r} lacks one of {expected}"
    assert "Traceback" not in err
    assert out == ""
    assert snapshot(tmp_path, project) == before, "the failed check wrote under the storage root or the project"
    assert not (tmp_path / "store").is_dir()
    if "ray.address" in expected[0]:
        assert elapsed < 10, f"the address check took {elapsed:.1f} s"


# -- the same checks, directly and together ---------------------------------------------------------------------


def test_bad_input_reports_every_problem_at_once(project, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    cfg = C.load(project / "sweep.yaml", [f"storage.root={tmp_path / 'file.txt' / 'store'}",
                                          "model.student.layers=[5]", "data.max_length=64"])
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check(cfg)
    assert isinstance(e.value, ValueError)
    assert [line.split(":")[0] for line in e.value.errors] == ["storage.root", "data.max_length",
                                                               "model.student.layers"]
    preflight.check(cfg, storage=False, models=False)  # what is left passes


def test_bad_input_refused_address_is_reported_quickly(project, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = C.load(project / "sweep.yaml", [f"storage.root={tmp_path / 'store'}", f"ray.address=ray://127.0.0.1:{port}"])
    preflight.check(cfg)  # the cluster is checked only when asked
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check(cfg, data=False, models=False, cluster=True)
    assert e.value.errors == [f"ray.address: ray://127.0.0.1:{port} is not reachable within 3 s (Connection refused); "
                              "allowed: host:port of a running head node's GCS, ray://host:port (Ray Client), auto "
                              "or local"]
    assert preflight.ray_host_port("auto") is None and preflight.ray_host_port("") is None
    assert preflight.ray_host_port("ray://head:10001") == ("head", 10001)
    assert preflight.ray_host_port("head") == ("head", 6379)


# -- good input passes ----------------------------------------------------------------------------------------


def test_the_toy_project_passes_preflight(project, tmp_path, capsys):
    before = snapshot(tmp_path, project)
    assert config_main(["validate", str(project / "sweep.yaml"), f"storage.root={tmp_path / 'store'}"]) == 0
    assert sweep_main([str(project / "sweep.yaml"), f"storage.root={tmp_path / 'store'}", "--dry-run",
                       "sweep.sample_rates=[0.01, 1.0]"]) == 0
    out = capsys.readouterr().out
    assert "estimated cost" in out
    assert snapshot(tmp_path, project) == before


@pytest.mark.parametrize("preset", ["smoke.yaml", "scarcity.yaml"])
def test_shipped_presets_pass_preflight(preset, shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("METAKD_DATA", str(shared_data))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = snapshot(tmp_path)
    rc = sweep_main([str(REPO / "sweeps" / preset), f"storage.root={tmp_path / 'store'}", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "estimated cost" in out and not any(line.startswith("error:") for line in err.splitlines())
    assert snapshot(tmp_path) == before


def test_preflight_teacher_domains_agree_with_the_cell():
    """preflight keeps its own copy of ``cell.teacher_domains`` (importing ``cell`` would close an import cycle
    through ``config.cli``): the two must agree."""
    from metakd_ray.cell import teacher_domains

    domains = ("a", "b", "c")
    for kind in C.TEACHER_KINDS:
        for target in domains:
            for exclude in (False, True):
                assert preflight._teacher_domains(kind, target, domains, exclude) == teacher_domains(
                    kind, target, domains, exclude)
