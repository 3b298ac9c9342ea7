import json

import numpy as np
import pytest
from PIL import Image

from diffscore.data.musicscore import (
    MusicScoreDataset,
    find_scale_dir,
    index_split,
    list_split_images,
    make_caption,
    page_to_square,
    read_metadata,
)
from diffscore.data.synthetic_scores import write_synthetic_musicscore
from diffscore.errors import DiffscoreError

SIZES = {"train": 5, "val": 2, "test": 3}


@pytest.mark.parametrize("layout", ["folders", "shards"])
@pytest.mark.parametrize("old_names", [False, True])
def test_loader_reads_both_layouts_under_old_and_new_names(tmp_path, layout, old_names):
    scale_dir = write_synthetic_musicscore(tmp_path, "400", SIZES, layout=layout, old_names=old_names, page_width=64)
    assert scale_dir.name == ("misicscore-toy" if old_names else "MisicScore-400")
    assert find_scale_dir(tmp_path, "400") == scale_dir
    assert find_scale_dir(tmp_path) == scale_dir
    raw = json.loads((scale_dir / "metadata.json").read_text())
    meta = read_metadata(scale_dir / "metadata.json")
    for split, n in SIZES.items():
        pages = index_split(scale_dir, split, meta)
        assert len(pages) == n
        for page in pages:  # joined by file name: the caption carries that page's own record
            rec = next(r for r in raw if r["file_name"] == page.path.name)
            assert page.caption == (
                f"a music score, instrumentation is {rec['instrumentation']}, key is {rec['key']}, "
                f"composer is {rec['composer']}, genre is {rec['genre']}"
            )
    ds = MusicScoreDataset(index_split(scale_dir, "train", meta), 32)
    image, caption = ds[0]
    assert image.shape == (1, 32, 32) and image.dtype.is_floating_point is False
    assert caption.startswith("a music score, instrumentation is")


def test_larger_scales_and_validation_folder_name(tmp_path):
    d = write_synthetic_musicscore(tmp_path, "14k", SIZES, layout="shards", val_name="validation", page_width=64)
    assert d.name == "MusicScore-14K" and (d / "validation.tar.gz").is_file()
    assert len(list_split_images(d, "val")) == 2
    assert find_scale_dir(tmp_path, "14k") == d
    old = write_synthetic_musicscore(tmp_path / "b", "200k", SIZES, old_names=True, metadata_format="mapping")
    assert old.name == "musicscore-200k" and len(read_metadata(old / "metadata.json")) == sum(SIZES.values())
    with pytest.raises(DiffscoreError, match="MusicScore-200k"):
        find_scale_dir(tmp_path, "200k")


def test_missing_folder_says_where_to_put_it(tmp_path):
    with pytest.raises(DiffscoreError, match=r"MisicScore-400.*huggingface.co/datasets/ZheqiDAI/MusicScore"):
        find_scale_dir(tmp_path / "nowhere", "400")


def test_captions_from_complete_and_partial_metadata():
    full = {"instrument": "violin", "key": "A major", "composer": "Bach", "style": "Baroque", "genre": "sonata"}
    assert make_caption(full) == (
        "a music score, instrumentation is violin, key is A major, composer is Bach, style is Baroque, genre is sonata"
    )
    assert make_caption({"key": "A major"}) == "a music score, key is A major"
    assert make_caption({}) == "a music score"
    template = {"composer": "by {}", "instrument": "for {}"}
    assert make_caption(full, template, prefix="score") == "score, by Bach, for violin"


def test_metadata_key_aliases_and_formats(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text(
        json.dumps(
            {
                "data": [
                    {"Image": "sub/IMSLP1_1.jpg", "Instrumentation": ["Violin", "Piano"], "Piece Style": "Romantic"},
                    {"filename": "IMSLP2_3.jpg", "composer": "Chopin", "genre_categories": "", "key": None},
                ]
            }
        )
    )
    meta = read_metadata(path)
    assert meta == {
        "IMSLP1_1.jpg": {"instrument": "Violin, Piano", "style": "Romantic"},
        "IMSLP2_3.jpg": {"composer": "Chopin"},
    }
    path.write_text(json.dumps({"IMSLP9_1.jpg": {"key": "D minor", "title": "Sonata"}}))
    assert read_metadata(path) == {"IMSLP9_1.jpg": {"key": "D minor", "title": "Sonata"}}


@pytest.mark.parametrize(
    "content, match",
    [
        ('[{"file_name": "a.jpg"},', r"metadata.json is not valid JSON"),
        ('[{"file_name": "a.jpg"}, 7]', r"metadata.json: record 1 is a int"),
        ('[{"file_name": "a.jpg"}, {"composer": "Bach"}]', r"metadata.json: record 1 names no image"),
        ('[{"file_name": "a.jpg", "composer": {"x": 1}}]', r"record 0, field 'composer' is dict"),
        ('{"a.jpg": "Bach"}', r"metadata.json: record 'a.jpg' is a str"),
        ('"hello"', r"holds a str"),
    ],
)
def test_malformed_metadata_names_file_and_record(tmp_path, content, match):
    path = tmp_path / "metadata.json"
    path.write_text(content)
    with pytest.raises(DiffscoreError, match=match):
        read_metadata(path)


def test_page_policies():
    page = np.full((300, 100), 255, np.uint8)  # a portrait page 100 wide, 300 tall
    page[:100, :50] = 0  # black top-left block: the left half of the top square
    img = Image.fromarray(page)
    top = np.asarray(page_to_square(img, 20, "top"))
    assert top.shape == (20, 20)
    assert top[:, :9].max() < 40 and top[:, 11:].min() > 215  # the top square, width fitted
    pad = np.asarray(page_to_square(img, 30, "pad"))  # whole page: 10 wide, centred, white around
    assert pad[:, :9].min() == 255 and pad[:, 21:].min() == 255 and pad[:5, 10:15].max() < 40
    center = np.asarray(page_to_square(img, 20, "center"))  # the middle square: all white
    assert center.min() > 215
    rgb = Image.fromarray(np.stack([page] * 3, -1))
    assert page_to_square(rgb, 16).mode == "L"
    with pytest.raises(DiffscoreError, match="page_policy"):
        page_to_square(img, 16, "stretch")


def test_hidden_resource_forks_are_not_pages(tmp_path):
    d = write_synthetic_musicscore(tmp_path, num_pages={"train": 2, "val": 0, "test": 0}, page_width=64)
    (d / "train" / "._IMSLP010000_1.jpg").write_bytes(b"\x00\x05\x16\x07 not an image")
    assert [p.name for p in list_split_images(d, "train")] == sorted(p.name for p in (d / "train").glob("IMSLP*"))
