import io
import os
import tarfile

import pytest

from diffscore.data.shards import extract_shard
from diffscore.errors import DiffscoreError


def _tar_with(path, name, data=b"x", kind=tarfile.REGTYPE, linkname=""):
    with tarfile.open(path, "w:gz") as tar:
        good = tarfile.TarInfo("train/ok.jpg")
        good.size = 1
        tar.addfile(good, io.BytesIO(b"y"))
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize(
    "name, kind, linkname, match",
    [
        ("../evil.jpg", tarfile.REGTYPE, "", r"escapes the destination"),
        ("train/../../evil.jpg", tarfile.REGTYPE, "", r"escapes the destination"),
        ("/tmp/evil.jpg", tarfile.REGTYPE, "", r"absolute path"),
        ("train/link.jpg", tarfile.SYMTYPE, "../../evil.jpg", r"is a link"),
        ("train/hard.jpg", tarfile.LNKTYPE, "/etc/passwd", r"is a link"),
    ],
)
def test_unsafe_shard_members_are_refused_and_nothing_is_written(tmp_path, name, kind, linkname, match):
    shard = tmp_path / "data" / "train.tar.gz"
    shard.parent.mkdir()
    _tar_with(shard, name, kind=kind, linkname=linkname)
    dest = tmp_path / "data" / "out" / "train"
    with pytest.raises(DiffscoreError, match=match):
        extract_shard(shard, dest)
    assert not dest.exists()
    assert not (tmp_path / "data" / "evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()
    assert [p.name for p in (tmp_path / "data" / "out").iterdir()] == []  # the temporary folder is gone too


def test_shard_is_extracted_once(tmp_path):
    shard = tmp_path / "train.tar.gz"
    _tar_with(shard, "train/b.jpg")
    dest = extract_shard(shard, tmp_path / "x" / "train")
    assert sorted(p.name for p in dest.rglob("*.jpg")) == ["b.jpg", "ok.jpg"]
    (dest / "train" / "b.jpg").unlink()
    extract_shard(shard, dest)  # already there: left alone
    assert not (dest / "train" / "b.jpg").exists()


def _plain_tar(path, name, data):
    with tarfile.open(path, "w") as tar:  # uncompressed: equal names and data give equal sizes
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_a_changed_shard_is_extracted_again(tmp_path):
    shard = tmp_path / "train.tar"
    _plain_tar(shard, "train/a.jpg", b"x")
    dest = extract_shard(shard, tmp_path / "x" / "train")
    size, mtime = shard.stat().st_size, shard.stat().st_mtime_ns
    _plain_tar(shard, "train/b.jpg", b"x" * 20_000)
    os.utime(shard, ns=(mtime, mtime))  # the same mtime, another size
    assert shard.stat().st_size != size
    assert [p.name for p in extract_shard(shard, dest).rglob("*.jpg")] == ["b.jpg"]
    size = shard.stat().st_size
    _plain_tar(shard, "train/c.jpg", b"y" * 20_000)
    os.utime(shard, ns=(mtime + 10**9, mtime + 10**9))  # the same size, another mtime
    assert shard.stat().st_size == size
    assert [p.name for p in extract_shard(shard, dest).rglob("*.jpg")] == ["c.jpg"]
    assert (dest / "train" / "c.jpg").read_bytes() == b"y" * 20_000
    assert sorted(p.name for p in dest.parent.iterdir()) == ["train"]  # no temporary or old folder left
    extract_shard(shard, dest)  # unchanged: left alone
    assert [p.name for p in dest.rglob("*.jpg")] == ["c.jpg"]
