"""Synthetic score pages drawn with PIL, written in MusicScore's published layout (a stand-in that needs no download).

Each page: a title and a tempo word, systems of five-line staves, a clef (treble: a tall loop crossing the staff;
bass: an arc in the upper half with two dots), a key signature (sharps or flats), note heads with stems, bar lines
and a final double bar. The instrument decides the staves: violin and flute read treble clef, cello and bassoon
bass clef, piano a braced grand staff (treble over bass). Metadata records hold instrumentation, clef, key, tempo,
composer and genre under keys the loader accepts. Everything is a function of ``seed``: the same call writes the
same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffscore.data.musicscore import SCALE_FOLDERS
from diffscore.errors import DiffscoreError
from diffscore.io import atomic_write

INSTRUMENT_CLEF = {"violin": "treble", "flute": "treble", "cello": "bass", "bassoon": "bass", "piano": "grand"}
CLEF_TEXT = {"treble": "treble", "bass": "bass", "grand": "treble and bass"}
# Key -> signed number of accidentals (+ sharps, - flats).
KEYS = {"C major": 0, "G major": 1, "D major": 2, "A major": 3, "F major": -1, "B-flat major": -2, "E-flat major": -3}
TEMPI = ("Adagio", "Andante", "Moderato", "Allegro", "Presto")
COMPOSERS = ("Bach", "Haydn", "Mozart", "Beethoven", "Schubert", "Chopin")
GENRES = ("sonata", "dance", "etude", "song")
OLD_SCALE_FOLDERS = {"400": "misicscore-toy", "14k": "musicscore-14K", "200k": "musicscore-200k"}
# Staff positions (steps of half a line spacing from the top line) of the key-signature accidentals.
SHARP_STEPS = {"treble": (0, 3, -1, 2), "bass": (2, 5, 1, 4)}
FLAT_STEPS = {"treble": (4, 1, 5, 2), "bass": (6, 3, 7, 4)}


def page_attributes(rng: np.random.Generator) -> dict[str, str]:
    instrument = str(rng.choice(list(INSTRUMENT_CLEF)))
    return {
        "instrument": instrument,
        "clef": CLEF_TEXT[INSTRUMENT_CLEF[instrument]],
        "key": str(rng.choice(list(KEYS))),
        "tempo": str(rng.choice(TEMPI)),
        "composer": str(rng.choice(COMPOSERS)),
        "genre": str(rng.choice(GENRES)),
    }


def _treble_clef(d: ImageDraw.ImageDraw, x: float, top: float, s: float, w: int) -> None:
    # a vertical spine from above the staff to below it, a loop around the second line from the bottom, a curl
    d.line([(x + s, top - 1.5 * s), (x + s, top + 5.2 * s)], fill=0, width=w)
    d.ellipse([x - 0.1 * s, top + 1.6 * s, x + 2.1 * s, top + 4.2 * s], outline=0, width=w)
    d.arc([x + 0.2 * s, top - 1.8 * s, x + 1.9 * s, top + 0.2 * s], 180, 360, fill=0, width=w)
    d.ellipse([x + 0.2 * s, top + 4.8 * s, x + 1.0 * s, top + 5.6 * s], fill=0)


def _bass_clef(d: ImageDraw.ImageDraw, x: float, top: float, s: float, w: int) -> None:
    # an arc in the upper half of the staff, a filled head on the fourth line, two dots around it
    d.arc([x - 0.6 * s, top - 0.1 * s, x + 2.2 * s, top + 3.0 * s], 200, 90, fill=0, width=w)
    d.ellipse([x - 0.2 * s, top + 0.6 * s, x + 0.6 * s, top + 1.4 * s], fill=0)
    for dy in (0.5, 1.5):
        d.ellipse([x + 2.5 * s, top + (dy - 0.2) * s, x + 2.9 * s, top + (dy + 0.2) * s], fill=0)


def _accidental(d: ImageDraw.ImageDraw, x: float, y: float, s: float, sharp: bool, w: int) -> None:
    if sharp:
        for dx in (0.2, 0.6):
            d.line([(x + dx * s, y - 1.1 * s), (x + dx * s, y + 1.1 * s)], fill=0, width=max(1, w // 2))
        for dy in (-0.35, 0.35):
            d.line([(x - 0.1 * s, y + (dy + 0.1) * s), (x + 0.9 * s, y + (dy - 0.1) * s)], fill=0, width=w)
    else:
        d.line([(x + 0.1 * s, y - 1.4 * s), (x + 0.1 * s, y + 0.5 * s)], fill=0, width=max(1, w // 2))
        d.ellipse([x + 0.1 * s, y - 0.3 * s, x + 0.8 * s, y + 0.5 * s], outline=0, width=max(1, w // 2))


def _staff(d, rng, clef: str, key: int, left: float, right: float, top: float, s: float, w: int) -> None:
    for i in range(5):
        d.line([(left, top + i * s), (right, top + i * s)], fill=0, width=max(1, w // 2))
    (_treble_clef if clef == "treble" else _bass_clef)(d, left + 0.5 * s, top, s, w)
    x = left + 4.0 * s
    steps = (SHARP_STEPS if key > 0 else FLAT_STEPS)[clef]
    for i in range(abs(key)):
        _accidental(d, x, top + steps[i] * s / 2, s, key > 0, w)
        x += 1.1 * s
    x += 1.0 * s
    bar_every = 4
    n = 0
    while x < right - 2.5 * s:
        step = int(rng.integers(-2, 11))  # half-line steps from the top line (ledger-free range mostly)
        y = top + step * s / 2
        d.ellipse([x, y - 0.45 * s, x + 1.3 * s, y + 0.45 * s], fill=0)
        if step >= 4:  # below the middle line: stem up on the right
            d.line([(x + 1.3 * s, y), (x + 1.3 * s, y - 3.5 * s)], fill=0, width=max(1, w // 2))
        else:
            d.line([(x, y), (x, y + 3.5 * s)], fill=0, width=max(1, w // 2))
        n += 1
        x += 2.4 * s
        if n % bar_every == 0 and x < right - 2.5 * s:
            d.line([(x - 0.5 * s, top), (x - 0.5 * s, top + 4 * s)], fill=0, width=max(1, w // 2))
            x += 0.6 * s
    d.line([(right - 0.6 * s, top), (right - 0.6 * s, top + 4 * s)], fill=0, width=max(1, w // 2))
    d.line([(right, top), (right, top + 4 * s)], fill=0, width=w)


def draw_page(attrs: dict[str, str], rng: np.random.Generator, width: int = 256) -> Image.Image:
    """A grayscale portrait page (width x 1.3 width) drawn from ``attrs`` (see ``page_attributes``)."""
    height = round(width * 1.3)
    img = Image.new("L", (width, height), 255)
    d = ImageDraw.Draw(img)
    s = max(3.0, width / 36)  # staff line spacing
    w = max(1, round(s / 3))  # stroke width
    left, right = 0.06 * width, 0.94 * width
    d.text((left, 0.02 * height), f"{attrs['tempo']}", fill=0)
    d.text((0.4 * width, 0.02 * height), f"{attrs['genre'].title()} ({attrs['composer']})", fill=0)
    layout = INSTRUMENT_CLEF[attrs["instrument"]]
    key = KEYS[attrs["key"]]
    top = 0.09 * height + 1.5 * s
    while True:
        staves = ["treble", "bass"] if layout == "grand" else [layout]
        system_height = 4 * s * len(staves) + 4 * s * (len(staves) - 1)
        if top + system_height + 2 * s > height:
            break
        for i, clef in enumerate(staves):
            _staff(d, rng, clef, key, left, right, top + i * 8 * s, s, w)
        if layout == "grand":  # the brace / system line joining the two staves
            d.line([(left - 0.3 * s, top), (left - 0.3 * s, top + system_height)], fill=0, width=w + 1)
        top += system_height + 4.5 * s
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_synthetic_musicscore(
    root: str | Path,
    scale: str = "400",
    num_pages: dict[str, int] | None = None,
    layout: str = "folders",
    old_names: bool = False,
    val_name: str = "val",
    metadata_format: str = "list",
    page_width: int = 256,
    seed: int = 0,
) -> Path:
    """Write synthetic pages in the published layout under ``root``; returns the scale folder.

    Args:
        root: parent folder; the scale folder (e.g. ``MisicScore-400``) is created inside it.
        scale: "400", "14k" or "200k": picks the folder name only.
        num_pages: pages per split, default {"train": 64, "val": 16, "test": 16}.
        layout: "folders" (loose JPEGs in train/ val/ test/) or "shards" (train.tar.gz, ...).
        old_names: use the older folder names (misicscore-toy, musicscore-14K, musicscore-200k).
        val_name: "val" or "validation".
        metadata_format: "list" ([{"file_name": ..., ...}]) or "mapping" ({file name: {...}}).
        page_width: page width in pixels (height 1.3x).
        seed: everything is a function of it.
    """
    if scale not in SCALE_FOLDERS:
        raise DiffscoreError(f"scale must be one of {sorted(SCALE_FOLDERS)}, got {scale!r}")
    if layout not in ("folders", "shards") or metadata_format not in ("list", "mapping"):
        raise DiffscoreError(f"layout must be folders|shards and metadata_format list|mapping; got {layout!r}")
    if val_name not in ("val", "validation"):
        raise DiffscoreError(f"val_name must be 'val' or 'validation', got {val_name!r}")
    num_pages = num_pages or {"train": 64, "val": 16, "test": 16}
    name = OLD_SCALE_FOLDERS[scale] if old_names else SCALE_FOLDERS[scale][0]
    dest = Path(root) / name
    if dest.exists():
        raise DiffscoreError(f"{dest} already exists; remove it or write elsewhere")
    records = []
    with atomic_write(dest, directory=True) as tmp:
        for split_idx, split in enumerate(("train", "val", "test")):
            folder = val_name if split == "val" else split
            files = {}
            for i in range(num_pages.get(split, 0)):
                rng = np.random.default_rng([seed, split_idx, i])
                attrs = page_attributes(rng)
                file_name = f"IMSLP{10000 * (split_idx + 1) + i:06d}_{int(rng.integers(1, 9))}.jpg"
                files[file_name] = _jpeg(draw_page(attrs, rng, page_width))
                records.append({"file_name": file_name, "instrumentation": attrs["instrument"], **_fields(attrs)})
            _write_split(tmp, folder, files, layout)
        meta = records if metadata_format == "list" else {r["file_name"]: r for r in records}
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=1))
    return dest


def _fields(attrs: dict) -> dict:
    return {k: attrs[k] for k in ("clef", "key", "tempo", "composer", "genre")}


def _write_split(root: Path, folder: str, files: dict[str, bytes], layout: str) -> None:
    """One split's pages as ``root/folder/*.jpg`` or a ``root/folder.tar.gz`` shard."""
    if layout == "folders":
        (root / folder).mkdir()
        for file_name, data in files.items():
            (root / folder / file_name).write_bytes(data)
        return
    with tarfile.open(root / f"{folder}.tar.gz", "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for file_name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{file_name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
