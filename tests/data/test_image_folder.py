import json
import zipfile

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
        bad = "dataset.json"
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
