import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from diffscore.data.convert import convert_dataset
from diffscore.data.image_folder import ImageFolderDataset
from diffscore.errors import DiffscoreError
from tests.fixtures import random_images, write_cifar10, write_dataset


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
    with pytest.raises(DiffscoreError, match="does not exist"):
        convert_dataset(str(src), str(tmp_path / "nodir" / "a.zip"))
    (tmp_path / "taken.zip").write_text("x")
    with pytest.raises(DiffscoreError, match="already exists"):
        convert_dataset(str(src), str(tmp_path / "taken.zip"))
    with pytest.raises(DiffscoreError, match="transform"):
        convert_dataset(str(src), str(tmp_path / "b.zip"), transform="stretch")
