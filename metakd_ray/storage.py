"""One storage root for every artefact (teachers, prototype scores, caches, sweep runs).

``storage.root`` is a local path or a ``pyarrow.fs`` URI (``s3://bucket/prefix``, ``gs://bucket/prefix``,
``hdfs://…``), so every node of a cluster reads and writes the same files. Ray Train and Ray Tune get the same
location through :meth:`Storage.uri` as their ``storage_path``.

Layout under the root::

    teachers/<teacher key>/   model/ (save_pretrained), prototype_scores.parquet, config.yaml, manifest.json
    caches/<fingerprint>/     part-*.parquet, manifest.json (written last)
    sweeps/<name>/            the Ray Tune experiment, results, plots and tables

Writes of single files are atomic (a local file is written to a temporary name and renamed; an object store
publishes an object only when its upload completes). A directory counts as complete only once its manifest, written
last, is there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no spaces): the fingerprint of a plain-data description."""
    return sha256_hex(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


class Storage:
    """A root directory on a ``pyarrow.fs`` filesystem; every path argument is relative to the root, with ``/``."""

    def __init__(self, root: str, filesystem: pafs.FileSystem | None = None):
        if filesystem is not None:
            self.fs, self.base = filesystem, root.rstrip("/")
            self._uri = root
        elif "://" in root:
            self.fs, self.base = pafs.FileSystem.from_uri(root)
            self.base = self.base.rstrip("/")
            self._uri = root.rstrip("/")
        else:
            self.fs = pafs.LocalFileSystem()
            self.base = str(Path(root).expanduser().resolve())
            self._uri = self.base
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self._uri!r})"

    def sub(self, *parts: str) -> "Storage":
        """A storage rooted at ``parts`` under this root (same filesystem)."""
        return Storage(self.uri(*parts)) if "://" in self._uri or self.is_local else Storage(self.path(*parts), self.fs)

    # -- paths -------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` under the root."""
        return posixpath.join(self.base, *parts) if parts else self.base

    def uri(self, *parts: str) -> str:
        """A location Ray accepts as ``storage_path`` (an absolute local path or a URI)."""
        return posixpath.join(self._uri, *parts) if parts else self._uri

    def local_path(self, *parts: str) -> Path:
        """The local path of ``parts``; only for a local root."""
        if not self.is_local:
            raise ValueError(f"{self._uri} is not a local directory; use Storage.local_copy or upload_dir")
        return Path(self.path(*parts))

    # -- queries -----------------------------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_file(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.File

    def listdir(self, *parts: str) -> list[str]:
        """Names directly under ``parts`` (sorted); [] if it does not exist."""
        sel = pafs.FileSelector(self.path(*parts), allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel))

    def walk(self, *parts: str) -> list[str]:
        """Relative paths (``/``-separated) of every file under ``parts``, sorted; [] if it does not exist."""
        base = self.path(*parts)
        sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        return sorted(posixpath.relpath(i.path, base) for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File)

    def tree_size(self, *parts: str) -> int:
        """Bytes of every file under ``parts``."""
        sel = pafs.FileSelector(self.path(*parts), recursive=True, allow_not_found=True)
        return sum(i.size or 0 for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)

    def size(self, *parts: str) -> int:
        return self.fs.get_file_info(self.path(*parts)).size

    # -- files -------------------------------------------------------------------------------------------------
    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole file atomically."""
        target = self.path(*parts)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        if self.is_local:
            tmp = f"{target}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), *parts)

    def delete(self, *parts: str) -> None:
        """Remove a file or a directory tree (no error if absent)."""
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    # -- directories -------------------------------------------------------------------------------------------
    def upload_dir(self, local_dir: str | Path, *parts: str) -> None:
        """Copy a local directory to ``parts``, replacing what was there. On a local root the new tree is moved
        in with a rename, so readers never see a half-copied directory."""
        target = self.path(*parts)
        if self.is_local:
            parent = Path(target).parent
            parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{Path(target).name}."))
            try:
                shutil.copytree(local_dir, staging, dirs_exist_ok=True)
                old = None
                if Path(target).exists():
                    old = parent / f".{Path(target).name}.old.{uuid.uuid4().hex}"
                    os.replace(target, old)
                os.replace(staging, target)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return
        self.delete(*parts)
        pafs.copy_files(str(Path(local_dir).resolve()), target, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    @contextlib.contextmanager
    def local_copy(self, *parts: str) -> Iterator[Path]:
        """A local directory holding ``parts``: the directory itself on a local root, else a temporary download."""
        if self.is_local:
            yield self.local_path(*parts)
            return
        with tempfile.TemporaryDirectory(prefix="metakd-") as tmp:
            pafs.copy_files(self.path(*parts), tmp, source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            yield Path(tmp)
