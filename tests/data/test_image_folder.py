import json
import os
import zipfile
import zlib

import numpy as np
import pytest
import torch

from diffscore.data.image_folder import ImageFolderDataset
from diffscore.errors import DiffscoreError
from tests.fixtures import png_bytes, random_images, write_dataset


@pytest.mark.parametrize("as_zip", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_reads_pixels_and_labels_exactly(tmp_path, as_zip, channels):
    images = random_images(5, size=8, channels=channels)
    labels = [3, 0, 7, 7, 1]
    path = write_dataset(tmp_path / ("d.zip" if as_zip else "d"), images, labels, as_zip=as_zip)
    if not as_zip:
        path.mkdir(exist_ok=True)
    ds = ImageFolderDataset(path, use_labels=True, xflip=True)
    assert ds.shape == (channels, 8, 8) and len(ds) == 10 and ds.num_classes == 8
    for i in range(5):
        img, label = ds[i]
        expected = torch.from_numpy(images[i]).reshape(8, 8, channels).permute(2, 0, 1)
        assert torch.equal(img, expected) and int(label) == labels[i]
        flipped, label2 = ds[i + 5]
        assert torch.equal(flipped, expected.flip(-1)) and int(label2) == labels[i]


def test_unlabelled_gives_zero_labels(tmp_path):
    (tmp_path / "d").mkdir()
    ds = ImageFolderDataset(write_dataset(tmp_path / "d", random_images(3, 8)))
    assert ds.labels is None and ds.num_classes == 0 and int(ds[2][1]) == 0


def broken(tmp_path, kind):
    """A data set with one defect; returns (path, use_labels, text the error must contain)."""
    d = tmp_path / "d"
    d.mkdir()
    imgs = random_images(3, 8)
    write_dataset(d, imgs, [0, 1, 2])
    bad = "00000/img00000001.png"
    if kind == "corrupted png":
        (d / bad).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif kind == "truncated png":
        (d / bad).write_bytes(png_bytes(imgs[1])[:60])
    elif kind == "non-square":
        (d / bad).write_bytes(png_bytes(random_images(1, 8)[0][:, :4]))
    elif kind == "not a power of two":
        for i in range(3):
            (d / f"00000/img{i:08d}.png").write_bytes(png_bytes(random_images(1, 12)[0]))
        bad = "00000/img00000000.png"
    elif kind == "mixed sizes":
        (d / bad).write_bytes(png_bytes(random_images(1, 16)[0]))
    elif kind == "rgba":
        (d / bad).write_bytes(png_bytes(np.zeros((8, 8, 4), dtype=np.uint8)))
    elif kind == "bad json":
        (d / "dataset.json").write_text("{not json")
        bad = "dataset.json"
    elif kind == "no labels key":
        (d / "dataset.json").write_text(json.dumps({"lables": []}))
        bad = "dataset.json"
    elif kind == "missing label":
        (d / "dataset.json").write_text(json.dumps({"labels": [["00000/img00000000.png", 1]]}))
    elif kind == "negative label":
        (d / "dataset.json").write_text(
            json.dumps({"labels": [[f"00000/img{i:08d}.png", lab] for i, lab in enumerate([0, -1, 2])]})
        )
    elif kind == "no dataset.json":
        (d / "dataset.json").unlink()
        bad = "dataset.json does not exist; add it"
    elif kind == "empty folder":
        for p in sorted(d.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        bad = str(d)
    return d, kind not in ("corrupted png", "truncated png", "non-square", "mixed sizes", "rgba"), bad


@pytest.mark.parametrize(
    "kind",
    [
        "corrupted png",
        "non-square",
        "not a power of two",
        "mixed sizes",
        "rgba",
        "bad json",
        "no labels key",
        "missing label",
        "negative label",
        "no dataset.json",
        "empty folder",
    ],
)
def test_broken_data_sets_name_the_file(tmp_path, kind):
    path, use_labels, needle = broken(tmp_path, kind)
    with pytest.raises(DiffscoreError) as err:
        ImageFolderDataset(path, use_labels=use_labels)
    assert needle in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_truncated_png_fails_at_decode_naming_the_file(tmp_path):
    path, _, needle = broken(tmp_path, "truncated png")
    try:
        ds = ImageFolderDataset(path)
    except DiffscoreError as e:  # some truncations already break the header
        assert needle in str(e)
        return
    with pytest.raises(DiffscoreError, match=needle):
        ds[1]


def test_missing_path_and_non_zip_file(tmp_path):
    with pytest.raises(DiffscoreError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope.zip")
    (tmp_path / "x.zip").write_text("hello")
    with pytest.raises(DiffscoreError, match="not a ZIP"):
        ImageFolderDataset(tmp_path / "x.zip")


def test_zip_handle_is_not_pickled(tmp_path):
    import pickle

    ds = ImageFolderDataset(write_dataset(tmp_path / "d.zip", random_images(2, 8), as_zip=True))
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1][0], ds[1][0])
    assert isinstance(ds._zip, zipfile.ZipFile) and clone._zip is not None


@pytest.mark.parametrize("side", [1, 2])
def test_images_too_small_for_the_networks_are_refused(tmp_path, side):
    path = write_dataset(tmp_path / "d.zip", random_images(2, side), as_zip=True)
    with pytest.raises(DiffscoreError, match=rf"img00000000\.png is {side}x{side}.*at least 4") as err:
        ImageFolderDataset(path)
    assert len(str(err.value).splitlines()) == 1


def test_duplicate_zip_members_are_refused(tmp_path):
    path = tmp_path / "dup.zip"
    with zipfile.ZipFile(path, "w") as zf, pytest.warns(UserWarning, match="Duplicate"):
        for seed in (0, 1):
            zf.writestr("00000/img00000000.png", png_bytes(random_images(1, 8, seed=seed)[0]))
    with pytest.raises(DiffscoreError, match=r"00000/img00000000\.png.*twice"):
        ImageFolderDataset(path)


@pytest.mark.parametrize("side, verify", [(100_000, True), (10_000, True), (10_000, False)])
def test_decompression_bomb_is_one_line(tmp_path, side, verify):
    from tests.data.test_dataset_writer import bomb_png

    d = tmp_path / "d"
    d.mkdir()
    write_dataset(d, random_images(2, 8))
    (d / "00000/img00000001.png").write_bytes(bomb_png(side, side))
    with pytest.raises(DiffscoreError, match=r"img00000001\.png .*decompression bomb") as err:
        ImageFolderDataset(d, verify=verify)[1]
    assert len(str(err.value).splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# Issue 34: a corrupt compressed stream, files that are no regular files, members of gigabytes, labels.


def corrupt_idat_png(arr: np.ndarray) -> bytes:
    """A PNG of ``arr`` whose header is valid and whose compressed pixel data (IDAT, past the zlib header) are
    garbled, with the chunk's CRC recomputed: only inflating the pixels finds the damage."""
    import struct

    data, pos = bytearray(png_bytes(arr)), 8
    while data[pos + 4 : pos + 8] != b"IDAT":
        pos += 12 + struct.unpack(">I", data[pos : pos + 4])[0]
    size, body = struct.unpack(">I", data[pos : pos + 4])[0], pos + 8
    for i in range(body + 2, body + size):
        data[i] ^= 0x5A
    struct.pack_into(">I", data, body + size, zlib.crc32(bytes(data[pos + 4 : body + size])))
    return bytes(data)


def test_torchvisions_decoder_crashes_the_process_on_a_corrupt_idat():
    """Why images are decoded by PIL: torchvision.io.decode_image (libpng) segfaults on this file (exit 139 in
    `fit`), so the old path is shown crashing in a child process, never in the test run."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from torchvision.io import decode_image, ImageReadMode\n"
        "data = bytearray(sys.stdin.buffer.read())\n"
        "decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)\n"
    )
    bad = corrupt_idat_png(random_images(1, 8)[0])
    child = subprocess.run([sys.executable, "-c", code], input=bad, capture_output=True, timeout=120)
    assert child.returncode == -11, (child.returncode, child.stderr[-300:])  # SIGSEGV


@pytest.mark.parametrize("as_zip", [False, True])
def test_a_corrupt_compressed_png_is_one_line_naming_the_file_also_in_a_worker(tmp_path, as_zip):
    images = random_images(3, 8)
    files = {f"00000/img{i:08d}.png": png_bytes(img) for i, img in enumerate(images)}
    files["00000/img00000001.png"] = corrupt_idat_png(images[1])
    path = tmp_path / ("d.zip" if as_zip else "d")
    if as_zip:
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
    ds = ImageFolderDataset(path)  # the header is valid: start-up accepts it
    where = f"{path}:00000/img00000001.png" if as_zip else str(path / "00000/img00000001.png")
    assert torch.equal(ds[0][0], torch.from_numpy(images[0]).permute(2, 0, 1))
    with pytest.raises(DiffscoreError) as err:
        ds[1]
    assert str(err.value).startswith(f"{where} is not a readable image (") and "\n" not in str(err.value)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    with pytest.raises(DiffscoreError) as err:  # raised in the worker, re-raised here with its traceback
        next(iter(loader))
    last = err.value.args[0].strip().splitlines()[-1]  # what the CLI prints (diffscore.commands._fail)
    assert last.split("DiffscoreError: ", 1)[-1].startswith(f"{where} is not a readable image (")


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "folder"])
def test_an_image_name_that_is_no_regular_file_is_refused_without_blocking(tmp_path, kind):
    from tests.test_io import within

    d = write_dataset(tmp_path, random_images(2, 8))
    odd = d / "00000/img00000002.png"
    if kind == "fifo":
        os.mkfifo(odd)
    elif kind == "folder":
        odd.mkdir()
    else:
        odd.symlink_to(kind)
    what = {"fifo": "a FIFO (named pipe)", "/dev/zero": "a character device", "folder": None}[kind]
    if what is None:  # a folder named *.png is a folder of the data set, not an image
        assert ImageFolderDataset(d).num_images == 2
        return
    with within(20), pytest.raises(DiffscoreError) as err:
        ImageFolderDataset(d)
    assert str(err.value) == f"{odd} is {what}, not a regular file; remove it"


def test_zip_members_of_gigabytes_are_refused_before_they_are_inflated(tmp_path):
    from tests.test_io import GIB, add_deflated_member, peak_python_bytes, zeros_deflate

    head = png_bytes(random_images(1, 8)[0])[:33]  # signature and IHDR: a valid 8x8 header, then gigabytes
    honest = write_dataset(tmp_path / "honest.zip", random_images(2, 8), as_zip=True)
    add_deflated_member(honest, "00000/img00000002.png", zeros_deflate(GIB, head), GIB + len(head))
    peak = peak_python_bytes(lambda: ImageFolderDataset(honest))
    with pytest.raises(DiffscoreError, match=r"honest\.zip:00000/img00000002\.png declares 1,073,741,857 bytes"):
        ImageFolderDataset(honest)
    assert peak < 16 << 20
    liar = write_dataset(tmp_path / "liar.zip", random_images(2, 8), as_zip=True)
    add_deflated_member(liar, "00000/img00000002.png", zeros_deflate(GIB, head), 4096)
    peak = peak_python_bytes(lambda: ImageFolderDataset(liar, verify=False)[2])
    with pytest.raises(DiffscoreError, match=r"liar\.zip:00000/img00000002\.png cannot be read \(BadZipFile"):
        ImageFolderDataset(liar, verify=False)[2]
    assert peak < 16 << 20


BAD_LABELS = [-3, "7", 2.9, True, 1e30, 10**9, 10**30, 100_000]


@pytest.mark.parametrize("label", BAD_LABELS, ids=repr)
def test_labels_that_are_not_small_non_negative_integers_are_refused(tmp_path, label):
    d = write_dataset(tmp_path, random_images(3, 8), [0, 1, 2])
    entries = [[f"00000/img{i:08d}.png", lab] for i, lab in enumerate([0, label, 2])]
    (d / "dataset.json").write_text(json.dumps({"labels": entries}))
    with pytest.raises(DiffscoreError) as err:
        ImageFolderDataset(d, use_labels=True)
    assert str(err.value) == (
        f"{d / 'dataset.json'}: the label of 00000/img00000001.png is {json.loads(json.dumps(label))!r}; labels "
        "must be integers >= 0 and < 100,000 (written as JSON integers, not strings, floats or booleans)"
    )
    entries[1][1] = 99_999  # the largest class index accepted
    (d / "dataset.json").write_text(json.dumps({"labels": entries}))
    assert ImageFolderDataset(d, use_labels=True).num_classes == 100_000
