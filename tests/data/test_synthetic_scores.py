import json

import numpy as np

from diffscore.data.synthetic_scores import (
    INSTRUMENT_CLEF,
    KEYS,
    draw_page,
    page_attributes,
    write_synthetic_musicscore,
)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_by_seed(tmp_path):
    sizes = {"train": 4, "val": 1, "test": 1}
    a = write_synthetic_musicscore(tmp_path / "a", num_pages=sizes, page_width=64, seed=3)
    b = write_synthetic_musicscore(tmp_path / "b", num_pages=sizes, page_width=64, seed=3)
    c = write_synthetic_musicscore(tmp_path / "c", num_pages=sizes, page_width=64, seed=4)
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)


def test_metadata_follows_the_generator_rules(tmp_path):
    d = write_synthetic_musicscore(tmp_path, num_pages={"train": 40, "val": 0, "test": 0}, page_width=64)
    records = json.loads((d / "metadata.json").read_text())
    assert len(records) == 40 and len({r["file_name"] for r in records}) == 40
    expected = {"treble": "treble", "bass": "bass", "grand": "treble and bass"}
    for r in records:
        assert r["clef"] == expected[INSTRUMENT_CLEF[r["instrumentation"]]]
        assert r["key"] in KEYS
        assert (d / "train" / r["file_name"]).is_file()
    assert len({r["instrumentation"] for r in records}) == len(INSTRUMENT_CLEF)


def test_clef_and_staves_are_drawn_as_the_metadata_says():
    """Same notes (same rng state), different instruments: treble and bass clefs differ only near the clef;
    a piano page has twice the staff lines per system, so it has more dark rows."""
    base = {"key": "C major", "tempo": "Allegro", "composer": "Bach", "genre": "song"}
    pages = {
        inst: np.asarray(draw_page({**base, "instrument": inst}, np.random.default_rng(0), 256)) < 128
        for inst in ("violin", "cello", "piano")
    }
    diff = pages["violin"] != pages["cello"]
    cols = np.flatnonzero(diff.any(0))
    s = 256 / 36
    assert cols.min() >= 0.06 * 256 - 1 and cols.max() <= 0.06 * 256 + 4 * s  # only the clef area differs
    assert diff.sum() > 50
    # the treble clef reaches above the top staff line, the bass clef does not
    top_line = round(0.09 * 256 * 1.3 + 1.5 * s)
    clef_cols = slice(int(0.06 * 256), int(0.06 * 256 + 3 * s))
    assert pages["violin"][top_line - int(1.2 * s) : top_line - 2, clef_cols].any()
    assert not pages["cello"][top_line - int(1.2 * s) : top_line - 2, clef_cols].any()
    brace = round(0.06 * 256 - 0.3 * s)  # the line joining a piano's two staves
    assert pages["piano"][:, brace - 1 : brace + 2].any(1).sum() > 12 * s
    assert pages["violin"][:, brace - 1 : brace + 2].any(1).sum() == 0


def test_page_attributes_cover_keys():
    rng = np.random.default_rng(0)
    seen = {page_attributes(rng)["key"] for _ in range(200)}
    assert seen == set(KEYS)
