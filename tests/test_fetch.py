"""fetch amazon: download from a local HTTP server, verify, unpack atomically, leave nothing behind on failure."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from metakd_ray.config import AMAZON_DOMAINS, DataConfig
from metakd_ray.data import DataError, column, fetch_amazon, load_splits, read_amazon
from metakd_ray.data.__main__ import main as cli_main
from metakd_ray.data.fetch import ARCHIVE_DOMAIN_DIRS, LABELED_MEMBERS

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("METAKD_DATA") or REPO.parent / "shared" / "data").resolve()
AMAZON = SHARED_DATA / "amazon-multi-domain-sentiment"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True, scope="module")
def _needs_shared_data(shared_data):
    """conftest's ``shared_data`` fails the tests loudly (never skips) when the real data is missing."""


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _archive(path: Path, extra: dict[str, bytes] | None = None, skip: str | None = None) -> bytes:
    """A tarball in the authors' layout (sorted_data_acl/<domain>/, kitchen_&_housewares) from the shared copy;
    the <reviews> wrapper is stripped in two domains and kept in the others (the reader takes both)."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for domain in AMAZON_DOMAINS:
            for label in ("positive", "negative"):
                name = f"sorted_data_acl/{ARCHIVE_DOMAIN_DIRS[domain]}/{label}.review"
                if name == skip:
                    continue
                raw = (AMAZON / domain / f"{label}.review").read_bytes()
                if domain in ("dvd", "kitchen"):
                    raw = raw.replace(b"<reviews>", b"").replace(b"</reviews>", b"")
                _add(tar, name, raw)
            _add(tar, f"sorted_data_acl/{ARCHIVE_DOMAIN_DIRS[domain]}/unlabeled.review", b"<review>\n</review>\n")
        for name, data in (extra or {}).items():
            _add(tar, name, data)
    return path.read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A local HTTP server (127.0.0.1, a free port) serving good and bad archives; yields (base URL, sha256)."""
    root = tmp_path_factory.mktemp("www")
    good = _archive(root / "good.tar.gz")
    (root / "truncated.tar.gz").write_bytes(good[: len(good) // 2])
    (root / "garbage.tar.gz").write_bytes(b"this is not a gzip file" * 100)
    _archive(root / "evil.tar.gz", extra={"../escaped.review": b"<review></review>"})
    _archive(root / "incomplete.tar.gz", skip=LABELED_MEMBERS[-1])
    # A labeled file that does not parse to 1000 reviews: replace the books positive file by a short one.
    with tarfile.open(root / "short.tar.gz", "w:gz") as tar:
        for name in LABELED_MEMBERS:
            domain = next(d for d, folder in ARCHIVE_DOMAIN_DIRS.items() if f"/{folder}/" in name)
            data = (AMAZON / domain / Path(name).name).read_bytes()
            _add(tar, name, data if "books/positive" not in name else b"<review><title>t</title></review>" * 999)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hashlib.sha256(good).hexdigest()
    httpd.shutdown()
    httpd.server_close()


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_fetch_success_then_noop(server, tmp_path, capsys):
    url, sha = server
    root = tmp_path / "data"
    message = fetch_amazon(root, url=f"{url}/good.tar.gz", sha256=sha.upper())
    assert message.startswith("fetched 8000 labeled reviews into") and "unlabeled.review files skipped" in message
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == sorted(LABELED_MEMBERS)  # unlabeled skipped, no temporary file left
    assert read_amazon(root, AMAZON_DOMAINS) == read_amazon(SHARED_DATA, AMAZON_DOMAINS)
    splits = load_splits(DataConfig(root=str(root)))
    assert len(splits["test"]) == 800 and column(splits["test"], "id")[0].startswith("books/")
    # Second run: nothing downloaded (the URL is not even reachable), nothing changed.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert cli_main(["fetch", "amazon", "--root", str(root), "--url", f"{url}/missing.tar.gz"]) == 0
    assert capsys.readouterr().out.startswith(f"already present: {root / 'sorted_data_acl'} (8000 labeled reviews)")
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_shared_layout_counts_as_present():
    assert fetch_amazon(SHARED_DATA, url="http://127.0.0.1:9/never").startswith("already present")


@pytest.mark.parametrize("name,sha,match", [
    ("good.tar.gz", "0" * 64, "sha256 .* does not match"),
    ("truncated.tar.gz", None, "not a valid gzip tar archive"),
    ("garbage.tar.gz", None, "not a valid gzip tar archive"),
    ("evil.tar.gz", None, r"unsafe member path.*\.\./escaped\.review"),
    ("incomplete.tar.gz", None, f"archive lacks {re.escape(LABELED_MEMBERS[-1])};"),
    ("short.tar.gz", None, "books/positive.review: 999 reviews .*expected 1000"),
    ("missing.tar.gz", None, "download of .* failed"),
])
def test_fetch_failures_leave_nothing(server, tmp_path, name, sha, match):
    url, _ = server
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("unrelated")
    for root in (tmp_path / "new" / "data", existing):
        with pytest.raises(DataError, match=match):
            fetch_amazon(root, url=f"{url}/{name}", sha256=sha)
        assert _tree(root) == ([] if root != existing else ["keep.txt"])
    assert not (tmp_path / "new").exists()  # the directories the fetch created are gone too
    assert not (tmp_path / "escaped.review").exists()


def test_incomplete_target_is_not_overwritten(tmp_path):
    (tmp_path / "sorted_data_acl" / "books").mkdir(parents=True)
    with pytest.raises(DataError, match="exists but is incomplete.*remove it"):
        fetch_amazon(tmp_path, url="http://127.0.0.1:9/never")


def test_fetch_cli_error_is_one_line_exit_2(server, tmp_path):
    url, _ = server
    out = subprocess.run([sys.executable, "-m", "metakd_ray.data", "fetch", "amazon", "--root", str(tmp_path / "d"),
                          "--url", f"{url}/truncated.tar.gz"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "truncated.tar.gz" in lines[0]
    assert not (tmp_path / "d").exists()
