"""diffscore/io.py: the bounded reader of user files (regular files only, a size cap before and while reading) and
the finite-weights check."""

from __future__ import annotations

import io
import os
import signal
import struct
import tracemalloc
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from diffscore.errors import DiffscoreError
from diffscore.io import BoundedReader, check_finite_weights, read_user_file, read_zip_member

GIB = 1 << 30


@contextmanager
def within(seconds: int):
    """Fail (instead of hanging the test run) when the block takes longer than ``seconds``."""

    def fail(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def zeros_deflate(num_bytes: int, prefix: bytes = b"") -> bytes:
    """A raw deflate stream that inflates to ``prefix`` and ``num_bytes`` zeros (a multiple of 1 MiB), built from
    one compressed MiB repeated: after a full flush a deflate stream refers to nothing before it, so copies chain."""
    assert num_bytes % (1 << 20) == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    one_mib = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return head + one_mib * (num_bytes >> 20) + b"\x03\x00"  # an empty final block


def add_deflated_member(path: Path, name: str, raw_deflate: bytes, declared_size: int) -> Path:
    """Append member ``name`` to the ZIP ``path`` (created if missing) holding ``raw_deflate`` and declaring
    ``declared_size`` inflated bytes, whatever the stream really inflates to (the headers are patched)."""
    with zipfile.ZipFile(path, "a" if path.exists() else "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(name, raw_deflate)
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(name).header_offset
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02" + data[local + 4 : local + 10])
    while data[central + 46 : central + 46 + len(name)] != name.encode():
        central = data.rfind(b"PK\x01\x02", 0, central)
    struct.pack_into("<H", data, local + 8, zipfile.ZIP_DEFLATED)
    struct.pack_into("<I", data, local + 22, declared_size)
    struct.pack_into("<H", data, central + 10, zipfile.ZIP_DEFLATED)
    struct.pack_into("<I", data, central + 24, declared_size)
    path.write_bytes(bytes(data))
    return path


def peak_python_bytes(fn) -> int:
    """The peak of Python allocations (bytes objects included) while ``fn()`` raises DiffscoreError."""
    tracemalloc.start()
    try:
        with pytest.raises(DiffscoreError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_regular_files_are_read_and_fifos_devices_and_folders_refused_without_blocking(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"abc")
    assert read_user_file(tmp_path / "ok.png") == b"abc"
    (tmp_path / "link.png").symlink_to(tmp_path / "ok.png")  # a link to a regular file is fine
    assert read_user_file(tmp_path / "link.png") == b"abc"
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "dir.png").mkdir()
    kinds = {"fifo.png": "a FIFO (named pipe)", "zero.png": "a character device", "dir.png": "a folder"}
    for name, kind in kinds.items():
        with within(10), pytest.raises(DiffscoreError) as err:
            read_user_file(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name} is {kind}, not a regular file; remove it"
    with pytest.raises(DiffscoreError, match=r"missing\.png cannot be opened \(No such file"):
        read_user_file(tmp_path / "missing.png")


def test_the_cap_is_checked_before_and_while_reading(tmp_path):
    (tmp_path / "big.bin").write_bytes(bytes(100))
    assert read_user_file(tmp_path / "big.bin", max_bytes=100) == bytes(100)
    with pytest.raises(DiffscoreError, match=r"big\.bin is 100 bytes, more than the 99 diffscore reads"):
        read_user_file(tmp_path / "big.bin", max_bytes=99)
    stream = BoundedReader(io.BytesIO(bytes(100)), "stream", max_bytes=10)  # a stream whose size is not known
    assert stream.read(4) == bytes(4)
    with pytest.raises(DiffscoreError, match="stream holds more than 10 bytes"):
        stream.read()


def test_zip_members_declaring_or_inflating_to_gigabytes_are_refused_without_the_memory(tmp_path):
    honest = add_deflated_member(tmp_path / "honest.zip", "bomb.png", zeros_deflate(GIB), GIB)
    liar = add_deflated_member(tmp_path / "liar.zip", "bomb.png", zeros_deflate(GIB), 4096)
    declared = add_deflated_member(tmp_path / "declared.zip", "big.png", zlib.compress(b"x")[2:-4], 3 * GIB)
    with zipfile.ZipFile(honest) as zf:  # the cap is checked before a byte is inflated
        peak = peak_python_bytes(lambda: read_zip_member(zf, "bomb.png", "honest.zip:bomb.png"))
        with pytest.raises(DiffscoreError, match=r"honest\.zip:bomb\.png declares 1,073,741,824 bytes"):
            read_zip_member(zf, "bomb.png", "honest.zip:bomb.png")
    assert peak < 8 << 20
    with zipfile.ZipFile(declared) as zf:
        with pytest.raises(DiffscoreError, match="declares 3,221,225,472 bytes, more than the 536,870,912"):
            read_zip_member(zf, "big.png")
    with zipfile.ZipFile(liar) as zf:  # zipfile stops at the declared size; the CRC then fails
        peak = peak_python_bytes(lambda: read_zip_member(zf, "bomb.png", "liar.zip:bomb.png"))
        with pytest.raises(DiffscoreError, match=r"liar\.zip:bomb\.png cannot be read \(BadZipFile: Bad CRC-32"):
            read_zip_member(zf, "bomb.png", "liar.zip:bomb.png")
    assert peak < 8 << 20


def test_check_finite_weights_names_the_file_and_the_first_bad_tensor():
    state = {"a": torch.ones(3), "steps": torch.tensor([2**40]), "meta": "text", "b": torch.zeros(2, 2)}
    check_finite_weights(state, "w.ckpt")  # integer tensors and other values are skipped
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = {**state, "b": torch.tensor([[0.0, bad], [bad, 1.0]]), "c": torch.full((2,), bad)}
        with pytest.raises(DiffscoreError) as err:
            check_finite_weights(broken, "w.ckpt")
        assert str(err.value) == (
            "w.ckpt: weight b holds 2 non-finite values (NaN/Inf) of 4; the file is damaged or comes from a "
            "diverged run: use an earlier checkpoint"
        )
    with pytest.raises(DiffscoreError, match="weight h holds 1 non-finite value "):
        check_finite_weights({"h": torch.tensor([1.0, float("nan")], dtype=torch.float16)}, "x.pkl")
