"""Storage: the same operations on a local root and on a non-local pyarrow filesystem."""

from __future__ import annotations

import pytest
from pyarrow import fs as pafs
from pyarrow.fs import _MockFileSystem

from metakd_ray.storage import Storage


@pytest.fixture(params=["local", "mock"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    return Storage("root", filesystem=_MockFileSystem())


def test_files_round_trip(storage):
    assert not storage.exists("a", "b.json")
    storage.write_json({"x": 1}, "a", "b.json")
    assert storage.exists("a", "b.json") and storage.is_file("a", "b.json")
    assert storage.read_json("a", "b.json") == {"x": 1}
    storage.write_bytes(b"new", "a", "b.json")  # overwrite
    assert storage.read_bytes("a", "b.json") == b"new"
    assert storage.listdir("a") == ["b.json"] and storage.listdir("missing") == []
    assert storage.size("a", "b.json") == 3
    storage.delete("a")
    assert not storage.exists("a", "b.json")


def test_directories_round_trip(storage, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01")
    (src / "top.txt").write_text("hi")
    storage.upload_dir(src, "models", "m")
    (src / "top.txt").write_text("changed")
    storage.upload_dir(src, "models", "m")  # replaces
    with storage.local_copy("models", "m") as d:
        assert (d / "top.txt").read_text() == "changed"
        assert (d / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    assert storage.listdir("models") == ["m"]  # no staging leftovers


def test_local_root_is_absolute_for_ray(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Storage("runs")
    assert s.uri() == str(tmp_path / "runs") and s.uri("teachers", "k") == str(tmp_path / "runs" / "teachers" / "k")
    assert s.is_local and isinstance(s.fs, pafs.LocalFileSystem)


def test_uri_root_uses_pyarrow_filesystem(tmp_path):
    s = Storage(f"file://{tmp_path}/r")
    s.write_json([1], "x.json")
    assert (tmp_path / "r" / "x.json").exists() and s.uri("x.json") == f"file://{tmp_path}/r/x.json"


def test_a_stale_cluster_address_is_ignored(tmp_path):
    import socket

    from metakd_ray.raycluster import running_cluster

    assert running_cluster(str(tmp_path)) is None  # no file
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed again below: nothing listens there
    (tmp_path / "ray_current_cluster").write_text(f"127.0.0.1:{dead}\n")
    assert running_cluster(str(tmp_path)) is None
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        (tmp_path / "ray_current_cluster").write_text(f"127.0.0.1:{srv.getsockname()[1]}\n")
        assert running_cluster(str(tmp_path)) == f"127.0.0.1:{srv.getsockname()[1]}"
