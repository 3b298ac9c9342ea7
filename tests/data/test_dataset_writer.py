import json
import os
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from diffscore.data.dataset_writer import _prepare, convert_dataset
from diffscore.data.image_folder import ImageFolderDataset
from diffscore.errors import DiffscoreError
from tests.fixtures import png_bytes, random_images, write_cifar10, write_dataset


def test_folder_round_trips_exactly_through_zip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    images = random_images(7, size=16)
    labels = [1, 4, 4, 0, 9, 2, 3]
    write_dataset(src, images, labels)
    out = convert_dataset(str(src), str(tmp_path / "out.zip"))
    ds = ImageFolderDataset(out, use_labels=True)
    assert len(ds) == 7 and ds.shape == (3, 16, 16)
    for i in range(7):
        img, label = ds[i]
        assert torch.equal(img, torch.from_numpy(images[i]).permute(2, 0, 1)) and int(label) == labels[i]
    with zipfile.ZipFile(out) as zf:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
        assert json.loads(zf.read("dataset.json"))["labels"][0] == ["00000/img00000000.png", 1]


def test_center_crop_and_resize_of_arbitrary_photos(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i, (w, h) in enumerate([(40, 30), (30, 50), (64, 64)]):
        Image.fromarray(np.full((h, w, 3), 40 * i, dtype=np.uint8)).save(src / f"p{i}.jpg")
    Image.fromarray(np.zeros((20, 20, 4), dtype=np.uint8)).save(src / "alpha.png")  # RGBA becomes RGB
    out = convert_dataset(str(src), str(tmp_path / "out"), resolution=16, transform="center-crop")
    ds = ImageFolderDataset(out)
    assert len(ds) == 4 and ds.shape == (3, 16, 16)
    with pytest.raises(DiffscoreError, match="not square"):
        convert_dataset(str(src), str(tmp_path / "o2.zip"), resolution=16)
    assert not (tmp_path / "o2.zip").exists() and not list(tmp_path.glob(".o2*"))


def test_cifar_archive_converts_with_labels(tmp_path):
    x, y = write_cifar10(tmp_path / "c", per_batch=3, archive=True)
    out = convert_dataset(str(tmp_path / "c" / "cifar-10-python.tar.gz"), str(tmp_path / "cifar.zip"))
    ds = ImageFolderDataset(out, use_labels=True)
    assert len(ds) == 15 and ds.labels.tolist() == y
    assert torch.equal(ds[4][0], torch.from_numpy(x[4]))


def test_bad_converter_options(tmp_path):
    src = write_dataset(tmp_path / "s.zip", random_images(2, 8), as_zip=True)
    with pytest.raises(DiffscoreError, match="power of two"):
        convert_dataset(str(src), str(tmp_path / "a.zip"), resolution=12)
    (tmp_path / "taken.zip").write_text("x")
    with pytest.raises(DiffscoreError, match="already exists"):
        convert_dataset(str(src), str(tmp_path / "taken.zip"))
    with pytest.raises(DiffscoreError, match="transform"):
        convert_dataset(str(src), str(tmp_path / "b.zip"), transform="stretch")


def bomb_png(width: int, height: int) -> bytes:
    """A 1x1 grayscale PNG whose header claims ``width`` x ``height`` (a decompression bomb as PIL sees it)."""
    data = bytearray(png_bytes(np.zeros((1, 1), dtype=np.uint8)))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def test_16_bit_pngs_are_scaled_to_8_bits_with_rounding(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    values = np.array([[0, 1, 128, 129], [257, 32767, 32768, 65535], [65534, 300, 1000, 60000], [5, 6, 7, 8]])
    Image.fromarray(values.astype(np.uint16)).save(src / "a.png")  # I;16
    Image.fromarray(values.astype(">u2")).save(src / "b.png")  # I;16B
    ds = ImageFolderDataset(convert_dataset(str(src), str(tmp_path / "out.zip")))
    expected = torch.from_numpy(np.rint(values * 255 / 65535).astype(np.uint8))[None]
    assert ds.shape == (1, 4, 4)
    assert torch.equal(ds[0][0], expected) and torch.equal(ds[1][0], expected)
    as_int32 = _prepare(Image.fromarray(values.astype(np.int32)), "c.png", None, None)  # mode I
    assert as_int32.mode == "L" and np.array_equal(np.asarray(as_int32), expected[0].numpy())


@pytest.mark.parametrize("side", [1, 2])
def test_images_smaller_than_fit_accepts_are_refused(tmp_path, side):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.zeros((side, side, 3), dtype=np.uint8)).save(src / "tiny.png")
    with pytest.raises(DiffscoreError, match=r"tiny\.png is .*at least 4") as err:
        convert_dataset(str(src), str(tmp_path / "out.zip"))
    assert len(str(err.value).splitlines()) == 1 and not (tmp_path / "out.zip").exists()
    with pytest.raises(DiffscoreError, match="at least 4"):
        convert_dataset(str(src), str(tmp_path / "out.zip"), resolution=side)


def test_duplicate_zip_members_are_refused(tmp_path):
    src = tmp_path / "dup.zip"
    with zipfile.ZipFile(src, "w") as zf, pytest.warns(UserWarning, match="Duplicate"):
        zf.writestr("a.png", png_bytes(random_images(1, 8)[0]))
        zf.writestr("a.png", png_bytes(random_images(1, 8, seed=1)[0]))
    with pytest.raises(DiffscoreError, match=r"a\.png.*twice"):
        convert_dataset(str(src), str(tmp_path / "out.zip"))


@pytest.mark.parametrize("side", [100_000, 10_000])  # beyond PIL's error limit; beyond its warning limit
def test_decompression_bomb_is_one_line(tmp_path, side):
    src = tmp_path / "src"
    src.mkdir()
    (src / "bomb.png").write_bytes(bomb_png(side, side))
    with pytest.raises(DiffscoreError, match=r"bomb\.png .*decompression bomb") as err:
        convert_dataset(str(src), str(tmp_path / "out.zip"))
    assert len(str(err.value).splitlines()) == 1


def test_missing_parents_of_dest_are_created(tmp_path):
    src = write_dataset(tmp_path / "s.zip", random_images(2, 8), as_zip=True)
    out = convert_dataset(str(src), str(tmp_path / "datasets" / "deeper" / "x.zip"))
    assert len(ImageFolderDataset(out)) == 2
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DiffscoreError, match="afile"):
        convert_dataset(str(src), str(tmp_path / "afile" / "x.zip"))


def test_a_grayscale_image_among_rgb_ones_names_file_mode_and_fix(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(random_images(1, 8)[0]).save(src / "a.png")
    Image.fromarray(random_images(1, 8, channels=1)[0]).save(src / "b.png")
    with pytest.raises(DiffscoreError) as err:
        convert_dataset(str(src), str(tmp_path / "out.zip"), resolution=8, transform="center-crop")
    message = str(err.value)
    assert "b.png" in message and "mode L" in message and "RGB" in message
    assert "--resolution" not in message and "--transform" not in message


def _source_folder(tmp_path):
    src = tmp_path / "data" / "imgs"
    src.mkdir(parents=True)
    write_dataset(src, random_images(2, 8), [0, 1])
    return src


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_dest_overlapping_the_source_is_refused(tmp_path, where):
    src = _source_folder(tmp_path)
    dest = {"same": src, "inside": src / "out.zip", "holds": src.parent}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DiffscoreError, match="--dest .*--source") as err:
        convert_dataset(str(src), str(dest), overwrite=True)
    assert len(str(err.value).splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_only_what_diffscore_wrote(tmp_path):
    src = _source_folder(tmp_path)
    for name in ("out.zip", "out"):
        first = convert_dataset(str(src), str(tmp_path / name))
        again = convert_dataset(str(src), str(tmp_path / name), max_images=1, overwrite=True)
        assert first == again and len(ImageFolderDataset(again)) == 1
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    edm_zip = write_dataset(tmp_path / "edm.zip", random_images(2, 8), [0, 1], as_zip=True)  # not diffscore's
    (tmp_path / "dataset.zip").write_text("not a zip")
    for dest in (folder, edm_zip, tmp_path / "dataset.zip"):
        before = dest.read_bytes() if dest.is_file() else None
        with pytest.raises(DiffscoreError, match="replaces only what `diffscore dataset` wrote"):
            convert_dataset(str(src), str(dest), overwrite=True)
        assert (dest.read_bytes() == before) if before is not None else (folder / "notes.txt").is_file()
    (tmp_path / "out" / "00000" / "extra.txt").write_text("added later")  # a marked folder with foreign files
    with pytest.raises(DiffscoreError, match="extra.txt"):
        convert_dataset(str(src), str(tmp_path / "out"), overwrite=True)


def test_a_failed_overwrite_keeps_the_old_dataset(tmp_path):
    """--overwrite swaps the new output in only once it is complete: a source that fails half-way (a corrupt image
    after good ones) leaves the old dataset as it was, also where a folder named *.zip is replaced by a ZIP."""
    src = _source_folder(tmp_path)
    folder, zip_folder = tmp_path / "out", tmp_path / "odd.zip"
    convert_dataset(str(src), str(folder))
    convert_dataset(str(src), str(tmp_path / "made"))
    (tmp_path / "made").rename(zip_folder)  # a folder of `diffscore dataset` that a ZIP --dest would replace
    before = {p: p.read_bytes() for d in (folder, zip_folder) for p in sorted(d.rglob("*")) if p.is_file()}
    (src / "zzz.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for dest in (folder, zip_folder):
        with pytest.raises(DiffscoreError, match="zzz.png"):
            convert_dataset(str(src), str(dest), overwrite=True)
    after = {p: p.read_bytes() for d in (folder, zip_folder) for p in sorted(d.rglob("*")) if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_output_is_marked_as_diffscores_and_stays_edm_compatible(tmp_path):
    out = convert_dataset(str(_source_folder(tmp_path)), str(tmp_path / "out.zip"))
    with zipfile.ZipFile(out) as zf:
        meta = json.loads(zf.read("dataset.json"))
    assert meta == {  # EDM's readers take "labels" and ignore the rest; "written_by" lets --overwrite replace it
        "labels": [["00000/img00000000.png", 0], ["00000/img00000001.png", 1]],
        "written_by": "diffscore dataset",
    }


@pytest.mark.parametrize("label", [-3, "7", 2.9, True, 1e30, 10**9], ids=repr)
@pytest.mark.parametrize("as_zip", [False, True])
def test_bad_labels_are_refused_not_coerced_and_nothing_is_written(tmp_path, label, as_zip):
    src = tmp_path / ("src.zip" if as_zip else "src")
    if not as_zip:
        src.mkdir()
    write_dataset(src, random_images(3, 8), as_zip=as_zip)  # no labels yet
    meta = json.dumps({"labels": [[f"00000/img{i:08d}.png", lab] for i, lab in enumerate([0, label, 2])]})
    if as_zip:
        with zipfile.ZipFile(src, "a") as zf:
            zf.writestr("dataset.json", meta)
    else:
        (src / "dataset.json").write_text(meta)
    with pytest.raises(DiffscoreError) as err:
        convert_dataset(str(src), str(tmp_path / "out.zip"))
    assert str(err.value) == (
        f"{src}/dataset.json: the label of 00000/img00000001.png is {json.loads(json.dumps(label))!r}; labels must "
        "be integers >= 0 and < 100,000 (written as JSON integers, not strings, floats or booleans)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_a_fifo_or_device_named_png_in_the_source_is_one_line_not_a_hang(tmp_path, kind):
    from tests.test_io import within

    (tmp_path / "src").mkdir()
    src = write_dataset(tmp_path / "src", random_images(2, 8))
    odd = src / "00000/odd.png"
    os.mkfifo(odd) if kind == "fifo" else odd.symlink_to(kind)
    with within(20), pytest.raises(DiffscoreError) as err:
        convert_dataset(str(src), str(tmp_path / "out"))
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    assert str(err.value) == f"{odd} is {what}, not a regular file; remove it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temporary folder left


def test_a_source_zip_member_of_gigabytes_is_refused_before_it_is_inflated(tmp_path):
    from tests.test_io import GIB, add_deflated_member, peak_python_bytes, zeros_deflate

    src = write_dataset(tmp_path / "src.zip", random_images(2, 8), as_zip=True)
    add_deflated_member(src, "00000/img00000002.png", zeros_deflate(GIB), GIB)
    peak = peak_python_bytes(lambda: convert_dataset(str(src), str(tmp_path / "out.zip")))
    with pytest.raises(DiffscoreError, match=r"src\.zip:00000/img00000002\.png declares 1,073,741,824 bytes"):
        convert_dataset(str(src), str(tmp_path / "out.zip"))
    assert peak < 16 << 20 and sorted(p.name for p in tmp_path.iterdir()) == ["src.zip"]
