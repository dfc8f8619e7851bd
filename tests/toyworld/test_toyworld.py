"""The known-answer world: determinism, attribute/mask consistency, captions, export, pool."""

import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from clip_interpret.errors import ClipInterpretError
from clip_interpret.toyworld import PROPERTIES, ToyWorld, export, generate, property_name, toy_pool
from clip_interpret.toyworld import world as w


def test_generation_is_deterministic_and_seeds_differ():
    a, b = generate(17, seed=3), generate(17, seed=3)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.caption == b.caption and a.attributes == b.attributes
    assert np.array_equal(a.masks, b.masks)
    others = [generate(17, seed=4), generate(18, seed=3)]
    assert all(not np.array_equal(np.asarray(a.image), np.asarray(o.image)) for o in others)


def test_held_out_worlds_share_no_images():
    train = {np.asarray(it.image).tobytes() for it in ToyWorld(200, seed=0)}
    held = {np.asarray(it.image).tobytes() for it in ToyWorld(200, seed=1)}
    assert not train & held


def test_every_property_is_defined_and_covered():
    items = list(ToyWorld(600, seed=0))
    for prop, values in PROPERTIES.items():
        seen = {it.attributes[prop] for it in items}
        assert seen == set(values), prop
    assert len(PROPERTIES["shape"]) >= 6 and len(PROPERTIES["color"]) >= 8
    assert len(PROPERTIES["position"]) >= 5 and len(PROPERTIES["pattern"]) >= 4


def _area_factor(shape: str) -> float:
    """Shape area / r^2 from the geometry of each shape (independent of rasterisation)."""
    star_inner = 0.45
    return {
        "circle": math.pi, "square": (2 * 0.88) ** 2, "diamond": 2 * 0.8, "triangle": 2 * 1.8 / 2,
        "cross": 2 * (2 * 0.72) - 0.72 ** 2, "star": 10 * 0.5 * star_inner * math.sin(math.pi / 5),
    }[shape]


def test_masks_match_attributes():
    for it in ToyWorld(300, seed=2):
        a = it.attributes
        assert it.masks.shape == (int(a["count"]), 64, 64)
        assert len(it.objects) == int(a["count"])
        assert not np.any(it.masks.sum(0) > 1), "objects overlap"
        # position: the region nearest to the mean object centre
        assert w.region_of([(o["x"], o["y"]) for o in it.objects]) == a["position"]
        pixels = np.asarray(it.image).astype(int)
        target = np.asarray(w.COLORS[a["color"]])
        for obj, mask in zip(it.objects, it.masks):
            assert obj["diameter"] == w.SIZES[a["size"]]
            r = obj["diameter"] / 2
            expected = _area_factor(a["shape"]) * r * r
            # rasterised polygons gain about a pixel ring at their edges: allow for it
            assert 0.6 * expected < mask.sum() < 1.3 * expected + 2.5 * obj["diameter"], (a["shape"], mask.sum())
            inside = pixels[mask]
            assert np.abs(inside - target).max() <= 14 + 1  # object colour, within its tone jitter
        ground = pixels[~it.masks.any(0)]
        base = np.asarray(w.BACKGROUNDS[a["background"]])
        tones = np.unique(ground, axis=0)
        assert len(tones) <= 2 and np.abs(tones - base).min(axis=1).min() <= 8
        assert (len(tones) == 1) == (a["pattern"] == "plain")


WORDS = {
    "color": w.COLOR_WORDS, "shape": w.SHAPE_WORDS, "size": w.SIZE_WORDS,
    "background": w.BACKGROUND_WORDS, "pattern": w.PATTERN_WORDS,
}


def test_captions_only_state_true_properties_in_varied_order():
    firsts = set()
    mentioned = {p: 0 for p in WORDS}
    items = list(ToyWorld(400, seed=5))
    for it in items:
        text = it.caption.lower()
        for prop, table in WORDS.items():
            for value, words in table.items():
                for word in words:
                    hit = re.search(rf"\b{re.escape(word)}s?\b", text)
                    if hit and value != it.attributes[prop]:
                        # the same word may name another property's true value (e.g. "white" backgrounds)
                        assert any(word in ws for p2, t2 in WORDS.items() if p2 != prop
                                   for v2, ws in t2.items() if v2 == it.attributes[p2]), (it.caption, prop, word)
                    if hit and value == it.attributes[prop]:
                        mentioned[prop] += 1
        firsts.add(text.split()[0])
    assert len(firsts) >= 6  # captions start in varied ways
    for prop, count in mentioned.items():
        assert 0.3 * len(items) < count < 0.97 * len(items), (prop, count)  # a subset, not always


def test_requested_attributes_and_errors():
    it = generate(3, seed=0, attributes={"Colour": "Blue", "shape": "star", "count": 3})
    assert it.attributes["color"] == "blue" and it.attributes["shape"] == "star" and it.masks.shape[0] == 3
    assert property_name("colours") == "color"
    with pytest.raises(ClipInterpretError, match="unknown toy-world property 'smell'"):
        generate(0, attributes={"smell": "sweet"})
    with pytest.raises(ClipInterpretError, match="unknown value 'teal' for toy-world property 'color'"):
        generate(0, attributes={"color": "teal"})
    with pytest.raises(ClipInterpretError, match="n > 0"):
        ToyWorld(0)
    with pytest.raises(ClipInterpretError, match="toyworld:N"):
        ToyWorld.from_source("toyworld:1:2:3")
    with pytest.raises(ClipInterpretError, match="integers"):
        ToyWorld.from_source("toyworld:ten:1")
    world = ToyWorld.from_source("toyworld:7:2")
    assert len(world) == 7 and world.seed == 2


def test_export_writes_images_attributes_and_masks(tmp_path):
    export(tmp_path / "x", 6, seed=1, progress=False)
    data = json.loads((tmp_path / "x" / "attributes.json").read_text())
    assert data["n"] == 6 and len(data["images"]) == 6
    for record in data["images"]:
        original = generate(record["index"], seed=1)
        with Image.open(tmp_path / "x" / record["image"]) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(original.image))
        with Image.open(tmp_path / "x" / record["mask"]) as m:
            labels = np.asarray(m)
        assert labels.max() == int(record["attributes"]["count"])
        assert np.array_equal(labels > 0, original.masks.any(0))
    rows = (tmp_path / "x" / "attributes.csv").read_text().strip().splitlines()
    assert len(rows) == 7 and rows[0].startswith("image,mask,caption,shape,color")


def test_export_errors(tmp_path):
    with pytest.raises(ClipInterpretError, match="must be > 0"):
        export(tmp_path / "y", 0, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ClipInterpretError, match="cannot write to export folder"):
        export(blocker / "sub", 2, progress=False)


def test_toy_pool_covers_every_value_with_several_wordings():
    pool = toy_pool()
    texts = [t for _, _, t in pool]
    assert len(texts) == len(set(texts))
    for prop, values in PROPERTIES.items():
        for value in values:
            wordings = [t for p, v, t in pool if p == prop and v == value]
            assert len(wordings) >= 3, (prop, value)
    assert {p for p, _, _ in pool} == set(PROPERTIES)
