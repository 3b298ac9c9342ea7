"""MusicScore (Lin, Dai, Kong 2024, arXiv 2406.11462): score pages from IMSLP paired with text built from metadata.

Published layout (FACTS.md; both the current and the older folder names, misspellings included, are accepted)::

    <root>/MisicScore-400/{train,val,test}/IMSLP<id>_<page>.jpg  + metadata.json   (older: misicscore-toy)
    <root>/MusicScore-14K/{train,val,test}.tar.gz                + metadata.json   (older: musicscore-14K)
    <root>/MusicScore-200k/{train,val,test}.tar.gz               + metadata.json   (older: musicscore-200k)

A split is a folder of loose images (``val/`` may also be called ``validation/``), or ``.tar.gz`` shards: the
file ``<split>.tar.gz`` (``.tgz``/``.tar`` too), shards ``<split>-*.tar.gz``, or shards inside the split folder.
Shards are extracted once (again when they change) into ``<scale folder>/.extracted/<shard name>/`` (or
``cache_dir``), safely: see diffscore/data/shards.py.

Images are joined to metadata records by file name (the base name, or the stem when extensions differ). The
metadata's exact keys are unverified (FACTS.md), so ``metadata.json`` may be a list of records, a mapping
``file name -> record``, or ``{"data"|"records"|"images"|"items": [records]}``, and each field accepts the
aliases in ``FIELD_ALIASES`` (compared case-insensitively, ignoring spaces, ``_`` and ``-``).

Page policy (``page_to_square``): scanned pages are portrait, ~1,300-1,900 px wide. Default ``"top"``: convert
to grayscale, resize so the width equals the resolution (aspect kept, Lanczos), keep the top square (the title
and the first systems) and pad with white below when the page is wider than tall. ``"pad"``: fit the whole page
into the square, white padding left/right (or below). ``"center"``: resize the short side, crop the centre.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from diffscore.data.image_folder import reading_image
from diffscore.data.shards import extract_shard
from diffscore.errors import DiffscoreError
from diffscore.io import open_user_file, read_user_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
# Scale -> accepted folder names, current first (FACTS.md: the published copy renamed them, misspellings included).
SCALE_FOLDERS = {
    "400": ("MisicScore-400", "misicscore-400", "MusicScore-400", "musicscore-400", "misicscore-toy"),
    "14k": ("MusicScore-14K", "musicscore-14K", "MusicScore-14k", "musicscore-14k"),
    "200k": ("MusicScore-200k", "musicscore-200k", "MusicScore-200K", "musicscore-200K"),
}
FILE_KEYS = ("file_name", "filename", "file", "image", "image_name", "img", "path", "image_path", "name")
# Canonical field -> accepted metadata keys (normalised: lower case without spaces, "_" and "-").
FIELD_ALIASES = {
    "instrument": ("instrument", "instruments", "instrumentation", "instr"),
    "key": ("key", "keysignature", "tonality", "piecekey"),
    "composer": ("composer", "composers", "author"),
    "style": ("style", "piecestyle", "period", "pieceperiod"),
    "genre": ("genre", "genres", "genrecategories", "category", "categories"),
    "title": ("title", "worktitle", "piecetitle"),
    "tempo": ("tempo",),
    "clef": ("clef", "clefs"),
}
DEFAULT_TEMPLATE = {
    "instrument": "instrumentation is {}",
    "key": "key is {}",
    "composer": "composer is {}",
    "style": "style is {}",
    "genre": "genre is {}",
}
DEFAULT_PREFIX = "a music score"
PAGE_POLICIES = ("top", "pad", "center")
RECORD_LISTS = ("data", "records", "images", "items")


def _norm(key: str) -> str:
    return re.sub(r"[\s_\-]", "", key.lower())


_ALIAS_TO_FIELD = {alias: field for field, aliases in FIELD_ALIASES.items() for alias in aliases}
_FILE_KEYS = {_norm(k) for k in FILE_KEYS}


# ---------------------------------------------------------------------------------------------------------------
# Folders and shards
def find_scale_dir(root: str | Path, scale: str | None = None) -> Path:
    """The folder of one scale: ``root`` itself if it holds ``metadata.json``, else ``root/<name>`` for the
    accepted names of ``scale`` ("400", "14k", "200k"; None: the first scale found)."""
    root = Path(root)
    if (root / "metadata.json").is_file():
        return root
    scales = [scale] if scale is not None else list(SCALE_FOLDERS)
    if scale is not None and scale not in SCALE_FOLDERS:
        raise DiffscoreError(f"data.scale must be one of {sorted(SCALE_FOLDERS)} or null, got {scale!r}")
    for s in scales:
        for name in SCALE_FOLDERS[s]:
            if (root / name / "metadata.json").is_file():
                return root / name
    names = ", ".join(n for s in scales for n in SCALE_FOLDERS[s])
    raise DiffscoreError(
        f"MusicScore not found under {root}: expected a folder with metadata.json and train/val/test (folders or "
        f".tar.gz shards), e.g. {root}/{SCALE_FOLDERS[scales[0]][0]}/ (accepted names: {names}). Download it from "
        "https://huggingface.co/datasets/ZheqiDAI/MusicScore and place it there; no download is attempted"
    )


def _is_shard(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(SHARD_SUFFIXES)


def _shard_stem(path: Path) -> str:
    name = path.name
    for suffix in SHARD_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def split_sources(scale_dir: Path, split: str) -> tuple[list[Path], list[Path]]:
    """(image folders, shards) holding ``split`` ("train", "val", "test") of a scale folder."""
    folders, shards = [], []
    for name in SPLIT_FOLDERS[split]:
        folder = scale_dir / name
        if folder.is_dir():
            folders.append(folder)
            shards += sorted(p for p in folder.rglob("*") if _is_shard(p))
        shards += sorted(
            p for p in scale_dir.iterdir() if _is_shard(p) and re.fullmatch(rf"{name}([-_.].*)?", _shard_stem(p))
        )
    return folders, shards


def list_split_images(scale_dir: Path, split: str, cache_dir: Path | None = None, extract: bool = True) -> list[Path]:
    """Image files of a split (loose images and extracted shards), sorted by file name then path."""
    folders, shards = split_sources(scale_dir, split)
    cache = cache_dir if cache_dir is not None else scale_dir / ".extracted"
    roots = list(folders)
    for shard in shards:
        roots.append(extract_shard(shard, cache / _shard_stem(shard), extract))
    images = {
        p
        for root in roots
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")  # no ._ forks
    }
    return sorted(images, key=lambda p: (p.name, str(p)))


# ---------------------------------------------------------------------------------------------------------------
# Metadata and captions
def _field_value(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise DiffscoreError(f"{where} is a boolean; expected text, a number, or a list of text")
    if isinstance(value, str | int | float):
        text = str(value).strip()
        return text or None
    if isinstance(value, list) and all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
        text = ", ".join(str(v).strip() for v in value if str(v).strip())
        return text or None
    raise DiffscoreError(f"{where} is {type(value).__name__}; expected text, a number, or a list of text")


def parse_record(record: Any, where: str, file_name: str | None = None) -> tuple[str, dict[str, str]]:
    """(file name, {canonical field: text}) of one metadata record; unknown keys are ignored."""
    if not isinstance(record, Mapping):
        raise DiffscoreError(f"{where} is a {type(record).__name__}, not an object of metadata fields")
    fields: dict[str, str] = {}
    for key, value in record.items():
        norm = _norm(str(key))
        if norm == "name" and not (isinstance(value, str) and value.lower().endswith(IMAGE_EXTENSIONS)):
            continue  # "name" is a file name only when it looks like one
        if norm in _FILE_KEYS:
            if not isinstance(value, str) or not value.strip():
                raise DiffscoreError(f"{where}: its file name ({key!r}) is {value!r}; expected a non-empty string")
            if file_name is None:
                file_name = value.strip()
            continue
        field = _ALIAS_TO_FIELD.get(norm)
        if field is not None and field not in fields:
            text = _field_value(value, f"{where}, field {key!r}")
            if text is not None:
                fields[field] = text
    if file_name is None:
        raise DiffscoreError(f"{where} names no image; give it one of the keys {', '.join(FILE_KEYS)}")
    return PurePosixPath(file_name.replace("\\", "/")).name, fields


def read_metadata(path: str | Path) -> dict[str, dict[str, str]]:
    """{image file name: {canonical field: text}} from a ``metadata.json`` (see the module docstring)."""
    path = Path(path)
    try:
        if not path.exists():
            raise FileNotFoundError(path)
        data = json.loads(read_user_file(path).decode("utf-8"))  # a regular file of at most MAX_USER_FILE_BYTES
    except FileNotFoundError:
        raise DiffscoreError(f"{path} does not exist; every MusicScore scale folder holds a metadata.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DiffscoreError(f"{path} is not valid JSON ({e}); re-download or repair it") from None
    items: Iterable[tuple[str, Any, str | None]]
    if isinstance(data, dict) and any(isinstance(data.get(k), list) for k in RECORD_LISTS):
        key = next(k for k in RECORD_LISTS if isinstance(data.get(k), list))
        items = ((f"{path}: record {i} of {key!r}", r, None) for i, r in enumerate(data[key]))
    elif isinstance(data, list):
        items = ((f"{path}: record {i}", r, None) for i, r in enumerate(data))
    elif isinstance(data, dict):
        items = ((f"{path}: record {name!r}", r, name) for name, r in data.items())
    else:
        raise DiffscoreError(f"{path} holds a {type(data).__name__}; expected a list of records or an object")
    out: dict[str, dict[str, str]] = {}
    for where, record, name in items:
        file_name, fields = parse_record(record, where, name)
        if file_name in out and out[file_name] != fields:
            raise DiffscoreError(f"{where} repeats the image {file_name!r} with other metadata")
        out[file_name] = fields
    return out


def make_caption(
    fields: Mapping[str, str], template: Mapping[str, str] | None = None, prefix: str = DEFAULT_PREFIX
) -> str:
    """``prefix, phrase_1, phrase_2, ...`` with one phrase per template field present in ``fields`` (in the
    template's order); missing fields are skipped. E.g. "a music score, instrumentation is violin, key is A major"."""
    template = DEFAULT_TEMPLATE if template is None else template
    parts = [prefix] if prefix else []
    for field, phrase in template.items():
        value = fields.get(field)
        if value:
            parts.append(phrase.format(value))
    return ", ".join(parts)


def check_template(template: Mapping[str, str]) -> None:
    for field, phrase in template.items():
        if field not in FIELD_ALIASES:
            raise DiffscoreError(f"data.caption_template: unknown field {field!r}; known: {sorted(FIELD_ALIASES)}")
        if phrase.count("{}") != 1:
            raise DiffscoreError(f"data.caption_template[{field!r}] = {phrase!r} must contain one '{{}}'")


# ---------------------------------------------------------------------------------------------------------------
# Pages
def page_to_square(img: Image.Image, resolution: int, policy: str = "top") -> Image.Image:
    """A grayscale ``resolution`` x ``resolution`` image of a page (policies in the module docstring)."""
    if policy not in PAGE_POLICIES:
        raise DiffscoreError(f"data.page_policy must be one of {PAGE_POLICIES}, got {policy!r}")
    img = img.convert("L")
    w, h = img.size
    r = resolution
    if policy == "top":
        scale = r / w
    elif policy == "pad":
        scale = r / max(w, h)
    else:
        scale = r / min(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((nw, nh), Image.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("L", (r, r), 255)
    if policy == "top":
        canvas.paste(img.crop((0, 0, nw, min(nh, r))), (0, 0))
    elif policy == "pad":
        canvas.paste(img, ((r - nw) // 2, 0))
    else:
        left, top = (nw - r) // 2, (nh - r) // 2
        canvas.paste(img.crop((left, top, left + r, top + r)), (0, 0))
    return canvas


@dataclass
class ScorePage:
    path: Path
    caption: str
    fields: dict[str, str]


def index_split(
    scale_dir: Path,
    split: str,
    metadata: Mapping[str, Mapping[str, str]],
    template: Mapping[str, str] | None = None,
    prefix: str = DEFAULT_PREFIX,
    require_metadata: bool = False,
    cache_dir: Path | None = None,
    extract: bool = True,
) -> list[ScorePage]:
    """The pages of a split with their captions; an image without a record gets the bare prefix (or an error
    with ``require_metadata``)."""
    by_stem = {PurePosixPath(name).stem: rec for name, rec in metadata.items()}
    pages = []
    for path in list_split_images(scale_dir, split, cache_dir, extract):
        fields = metadata.get(path.name)
        if fields is None:
            fields = by_stem.get(path.stem)
        if fields is None:
            if require_metadata:
                raise DiffscoreError(
                    f"{scale_dir / 'metadata.json'} has no record for {path}; set data.require_metadata false"
                )
            fields = {}
        pages.append(ScorePage(path, make_caption(fields, template, prefix), dict(fields)))
    return pages


def load_page(path: Path, resolution: int, policy: str = "top") -> Image.Image:
    # the bounded reader (a regular file, at most MAX_USER_FILE_BYTES); one-line errors; decompression bombs refused
    with reading_image(str(path)), open_user_file(path) as f, Image.open(f) as img:
        return page_to_square(img, resolution, policy)


class MusicScoreDataset(Dataset):
    """Pages of one split as (uint8 [1, R, R] image, caption string); ``in_memory`` decodes all pages once."""

    def __init__(self, pages: list[ScorePage], resolution: int, policy: str = "top", in_memory: bool = False) -> None:
        self.pages = pages
        self.resolution = resolution
        self.policy = policy
        self.images: Tensor | None = None
        if in_memory and pages:
            self.images = torch.stack([self._read(i) for i in range(len(pages))])  # [N, 1, R, R]

    def _read(self, index: int) -> Tensor:
        img = load_page(self.pages[index].path, self.resolution, self.policy)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())[None]  # [1, R, R]

    def __len__(self) -> int:
        return len(self.pages)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        image = self.images[index] if self.images is not None else self._read(index)
        return image, self.pages[index].caption

    @property
    def captions(self) -> list[str]:
        return [p.caption for p in self.pages]
