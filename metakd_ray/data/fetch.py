"""Download the Amazon reviews archive (Blitzer et al. 2007) into the data root, verified and atomically.

``python -m metakd_ray.data fetch amazon [--root DIR] [--url URL] [--sha256 HEX]``

The archive is streamed to a temporary file inside the root, checked (optional sha256; always: a valid gzip
tar holding ``sorted_data_acl/<domain>/{positive,negative}.review`` for the four domains, with no member
escaping the target directory), and only the eight labeled files are extracted, into a temporary directory
inside the root; each must parse to exactly 1000 reviews. Then the directory is renamed into place. The
``unlabeled.review`` files (most of the archive's size) are skipped: Meta-KD does not use them. On any failure
every temporary file is removed and nothing is left in the root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from metakd_ray.config import AMAZON_DOMAINS
from metakd_ray.data.readers import SENTIMENT_LABELS, DataError, _domain_dir, find_amazon_dir, read_labeled_review_file

DEFAULT_URL = "https://www.cs.jhu.edu/~mdredze/datasets/sentiment/domain_sentiment_data.tar.gz"
ARCHIVE_DIR = "sorted_data_acl"
ARCHIVE_DOMAIN_DIRS = {"books": "books", "dvd": "dvd", "electronics": "electronics", "kitchen": "kitchen_&_housewares"}
LABELED_MEMBERS: tuple[str, ...] = tuple(
    f"{ARCHIVE_DIR}/{ARCHIVE_DOMAIN_DIRS[d]}/{label}.review" for d in AMAZON_DOMAINS for label in SENTIMENT_LABELS
)
_CHUNK = 1 << 16


def verify_amazon(base: Path) -> int:
    """Check every labeled file under ``base`` as loading does (``readers.check_labeled_reviews``: exactly 1000
    reviews with text, every ``<review>`` closed); return the total. Raises :class:`DataError` naming the first bad
    file."""
    total = 0
    for domain in AMAZON_DOMAINS:
        folder = _domain_dir(base, domain)
        if folder is None:
            raise DataError(f"{base}: no {{positive,negative}}.review for domain {domain}")
        for label in SENTIMENT_LABELS:
            total += len(read_labeled_review_file(folder / f"{label}.review"))
    return total


def _download(url: str, dest: Path) -> str:
    """Stream ``url`` into ``dest`` with a progress bar (on a terminal); return the sha256 hex digest."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=Path(url).name, disable=None) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(f"download of {url} failed: {getattr(e, 'reason', None) or e}") from e
    return digest.hexdigest()


def _safe_name(name: str) -> bool:
    """True if a member name stays inside the extraction directory (no absolute path, no "..")."""
    p = PurePosixPath(name.replace("\\", "/"))
    return bool(p.parts) and not p.is_absolute() and ".." not in p.parts


def _extract_labeled(archive: Path, dest: Path, source: str) -> None:
    """Check ``archive`` and extract the labeled ``.review`` files into ``dest``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()  # reads the whole archive: a truncated or corrupt one fails here
            # Only regular files are extracted below, but an archive with escaping names or links is rejected
            # outright: it is not the authors' archive.
            bad = [m.name for m in members if not _safe_name(m.name)
                   or (m.issym() and not _safe_name(str(PurePosixPath(m.name).parent / m.linkname)))
                   or (m.islnk() and not _safe_name(m.linkname))]
            if bad:
                raise DataError(f"{source}: unsafe member path(s) in archive (outside the target directory): "
                                f"{', '.join(bad[:3])}")
            by_name = {str(PurePosixPath(m.name)): m for m in members if m.isfile()}
            missing = [n for n in LABELED_MEMBERS if n not in by_name]
            if missing:
                raise DataError(f"{source}: archive lacks {', '.join(missing)}; is it domain_sentiment_data.tar.gz?")
            for name in LABELED_MEMBERS:
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(by_name[name])
                assert src is not None
                with src:
                    data = src.read()  # a corrupt member fails here, as an archive error (one file is ~1.5 MB)
                try:
                    target.write_bytes(data)
                except OSError as e:  # disk full, permissions: not the archive's fault
                    raise DataError(f"could not write {target}: {e}") from e
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{source}: not a valid gzip tar archive ({type(e).__name__}: {e})") from e


def fetch_amazon(root: Path, url: str = DEFAULT_URL, sha256: str | None = None) -> str:
    """Make ``<root>/sorted_data_acl`` hold the verified labeled Amazon reviews; return a one-line message.

    A no-op ("already present") if the data is already under ``root`` in either layout and verifies.
    Raises :class:`DataError` (nothing left behind) on any failure.
    """
    root = Path(root).expanduser()
    try:
        base = find_amazon_dir(root, AMAZON_DOMAINS)
    except DataError:
        base = None
    if base is not None:
        try:
            n = verify_amazon(base)
        except DataError as e:
            raise DataError(f"{e}; the data under {base} is damaged: remove it and run this command again") from e
        return f"already present: {base} ({n} labeled reviews)"
    target = root / ARCHIVE_DIR
    if target.exists():
        raise DataError(f"{target} exists but is incomplete (not every domain has positive.review and "
                        f"negative.review); remove it and run this command again")
    new_dirs = [d for d in (root, *root.parents) if not d.exists()]  # removed again if the fetch fails
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".metakd-fetch-", suffix=".tar.gz")
    os.close(fd)
    archive = Path(tmp_name)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".metakd-fetch-"))
    try:
        digest = _download(url, archive)
        if sha256 and digest.lower() != sha256.strip().lower():
            raise DataError(f"{url}: sha256 {digest} does not match the expected {sha256.strip().lower()}")
        _extract_labeled(archive, staging, url)
        n = verify_amazon(staging / ARCHIVE_DIR)
        os.rename(staging / ARCHIVE_DIR, target)  # atomic: the data appears whole or not at all
    except BaseException:
        archive.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        for d in new_dirs:  # deepest first; only while empty
            if any(d.iterdir()):
                break
            d.rmdir()
        raise
    archive.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    return (f"fetched {n} labeled reviews into {target} (sha256 {digest}; unlabeled.review files skipped: "
            f"Meta-KD does not use them)")
