"""The known-answer world: seeded synthetic images whose every property is known.

Each image (64 x 64 RGB by default) shows 1-3 objects that share one shape,
colour and size, on a background with one colour and one pattern. Every
property is defined for every image:

* ``shape``, ``color``, ``size``, ``count``: shared by all objects of the image;
* ``position``: the region (top left, top right, bottom left, bottom right,
  center) whose centre point is nearest to the mean of the objects' centres —
  generation draws the objects until that region is the intended one;
* ``background`` and ``pattern``: the whole background.

A caption mentions a random subset of the properties, in varied order and
wording, so that each property has to be encoded on its own. Image ``i`` of a
world with seed ``s`` depends only on ``(s, i)``: worlds are reproducible and
different seeds give held-out data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ClipInterpretError

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 60),
    "blue": (40, 80, 225), "purple": (140, 50, 185), "pink": (250, 135, 195), "brown": (125, 72, 30),
}
SIZES = {"small": 10, "large": 17}  # object diameter in pixels at 64 x 64
COUNTS = (1, 2, 3)
POSITIONS = {  # region centre, as a fraction of the image side (x, y)
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75), "center": (0.5, 0.5),
}
BACKGROUNDS = {
    "white": (238, 238, 238), "black": (22, 22, 22), "gray": (128, 128, 128),
    "beige": (226, 206, 162), "teal": (22, 118, 122),
}
PATTERNS = ("plain", "stripes", "dots", "checkers", "noise")

# property name -> its values (as words); the order is the class order everywhere
PROPERTIES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "count": tuple(str(c) for c in COUNTS),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
    "pattern": PATTERNS,
}

ALIASES = {"colour": "color", "shapes": "shape", "colors": "color", "colours": "color", "sizes": "size",
           "counts": "count", "number": "count", "positions": "position", "location": "position",
           "backgrounds": "background", "background color": "background", "background colour": "background",
           "patterns": "pattern", "texture": "pattern", "background pattern": "pattern"}


def property_name(name: str) -> str:
    """Normalise a property name ("Colour" -> "color"); raise a clear error for unknown names."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in PROPERTIES:
        raise ClipInterpretError(f"unknown toy-world property {name!r}; known: {', '.join(PROPERTIES)}")
    return key


def check_value(prop: str, value) -> str:
    prop = property_name(prop)
    text = str(value).strip().lower()
    if text not in PROPERTIES[prop]:
        raise ClipInterpretError(f"unknown value {value!r} for toy-world property {prop!r}; "
                                 f"known: {', '.join(PROPERTIES[prop])}")
    return text


@dataclass
class ToyImage:
    """One generated image with its full record."""

    index: int
    seed: int
    image: Image.Image
    attributes: dict[str, str]  # property -> value (all properties)
    objects: list[dict] = field(default_factory=list)  # centre x, y and diameter of each object
    masks: np.ndarray | None = None  # [n_objects, H, W] bool
    caption: str = ""

    def record(self) -> dict:
        return {"index": self.index, "seed": self.seed, "caption": self.caption,
                "attributes": dict(self.attributes), "objects": [dict(o) for o in self.objects]}


# ----------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, d: float) -> list[tuple[float, float]] | None:
    r = d / 2
    if shape == "square":
        s = r * 0.88
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        points = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return points
    if shape == "cross":
        t = r * 0.36
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    return None  # circle


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, d: float, fill) -> None:
    points = _polygon(shape, cx, cy, d)
    if points is None:
        r = d / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(points, fill=fill)


def _tone(rgb, rng: np.random.Generator, spread: int = 14) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.int16) + rng.integers(-spread, spread + 1, 3), 0, 255)


def _background(color: str, pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
    base = _tone(BACKGROUNDS[color], rng, 8).astype(np.float32)
    lum = base.mean()
    second = base + (-45.0 if lum > 128 else 45.0)  # the pattern's second tone: darker on light grounds
    yy, xx = np.mgrid[0:size, 0:size]
    if pattern == "plain":
        mask = np.zeros((size, size), bool)
    elif pattern == "stripes":
        period = int(rng.integers(6, 10))
        along = [yy, xx, xx + yy][int(rng.integers(0, 3))]
        mask = (along // (period // 2)) % 2 == 0
    elif pattern == "dots":
        period = int(rng.integers(7, 10))
        ox, oy = rng.integers(0, period, 2)
        dx = (xx + ox) % period - period / 2
        dy = (yy + oy) % period - period / 2
        mask = dx * dx + dy * dy <= (period * 0.22) ** 2 + 1
    elif pattern == "checkers":
        cell = int(rng.integers(5, 9))
        mask = ((xx // cell) + (yy // cell)) % 2 == 0
    elif pattern == "noise":
        noise = rng.random((size // 2, size // 2)) > 0.5
        mask = np.kron(noise, np.ones((2, 2), bool))
    else:
        raise ValueError(pattern)
    out = np.where(mask[..., None], second, base)
    return np.clip(out, 0, 255).astype(np.uint8)


def _place(count: int, diameter: int, position: str, size: int, rng: np.random.Generator):
    """Object centres (x, y), non-overlapping, inside the image, nearest region = ``position``."""
    fx, fy = POSITIONS[position]
    cx, cy = fx * size, fy * size
    r = diameter / 2
    spread = size * 0.3 if count > 1 else size * 0.07
    min_gap = 1.28 * diameter + 2  # every shape fits in a circle of radius 1.28 r; keep a 2-pixel gap
    low, high = r + 1, size - r - 1  # clip with min/max: the same floats as np.clip, at twice the speed
    for _ in range(2000):
        pts: list[tuple[float, float]] = []
        for _ in range(count):  # one object at a time, each clear of the ones before
            for _ in range(50):
                x = float(min(max(cx + rng.uniform(-spread, spread), low), high))
                y = float(min(max(cy + rng.uniform(-spread, spread), low), high))
                if all(math.dist((x, y), p) >= min_gap for p in pts):
                    pts.append((x, y))
                    break
        if len(pts) == count and region_of(pts, size) == position:
            return pts
    raise RuntimeError(f"could not place {count} objects of {diameter}px at {position}")  # pragma: no cover


def region_of(centres, size: int = IMAGE_SIZE) -> str:
    """The position property: the region whose centre is nearest to the objects' mean centre."""
    mx = sum(p[0] for p in centres) / len(centres)
    my = sum(p[1] for p in centres) / len(centres)
    return min(POSITIONS, key=lambda k: (POSITIONS[k][0] * size - mx) ** 2 + (POSITIONS[k][1] * size - my) ** 2)


def render(attributes: dict[str, str], rng: np.random.Generator, size: int = IMAGE_SIZE, masks: bool = True):
    """Draw an image with the given attributes -> (PIL image, objects, masks [n, H, W] or None
    without ``masks``: the same image, a quarter faster; the masks draw no random numbers)."""
    canvas = Image.fromarray(_background(attributes["background"], attributes["pattern"], size, rng))
    draw = ImageDraw.Draw(canvas)
    count = int(attributes["count"])
    diameter = round(SIZES[attributes["size"]] * size / IMAGE_SIZE)
    fill = tuple(int(c) for c in _tone(COLORS[attributes["color"]], rng))
    centres = _place(count, diameter, attributes["position"], size, rng)
    objects, drawn = [], []
    for x, y in centres:
        _draw_shape(draw, attributes["shape"], x, y, diameter, fill)
        if masks:
            mask = Image.new("L", (size, size), 0)
            _draw_shape(ImageDraw.Draw(mask), attributes["shape"], x, y, diameter, 255)
            drawn.append(np.asarray(mask) > 127)
        objects.append({"x": round(x, 2), "y": round(y, 2), "diameter": diameter})
    return canvas, objects, np.stack(drawn) if masks else None


# ---------------------------------------------------------------- captions
COUNT_WORDS = {1: ["a", "one", "a single", "a lone"], 2: ["two", "a pair of", "2"], 3: ["three", "3", "a trio of"]}
SIZE_WORDS = {"small": ["small", "tiny", "little"], "large": ["large", "big", "huge"]}
COLOR_WORDS = {
    "red": ["red", "crimson"], "orange": ["orange", "amber"], "yellow": ["yellow", "golden"],
    "green": ["green", "emerald"], "blue": ["blue", "azure"], "purple": ["purple", "violet"],
    "pink": ["pink", "rose"], "brown": ["brown", "chocolate"],
}
SHAPE_WORDS = {
    "circle": ["circle", "disc"], "square": ["square", "box"], "triangle": ["triangle"],
    "star": ["star"], "cross": ["cross", "plus sign"], "diamond": ["diamond", "rhombus"],
}
GENERIC = ["shape", "object", "item", "thing"]
POSITION_WORDS = {
    "top left": ["in the top left", "in the upper left corner", "at the top left"],
    "top right": ["in the top right", "in the upper right corner", "at the top right"],
    "bottom left": ["in the bottom left", "in the lower left corner", "at the bottom left"],
    "bottom right": ["in the bottom right", "in the lower right corner", "at the bottom right"],
    "center": ["in the center", "in the middle", "at the centre"],
}
BACKGROUND_WORDS = {"white": ["white"], "black": ["black"], "gray": ["gray", "grey"], "beige": ["beige", "sand"],
                    "teal": ["teal"]}
PATTERN_WORDS = {
    "plain": ["plain", "solid"], "stripes": ["striped", "stripy"], "dots": ["dotted", "polka-dot"],
    "checkers": ["checkered", "checkerboard"], "noise": ["noisy", "grainy"],
}
OPENERS = ["", "", "a photo of ", "an image of ", "a picture of ", "a drawing of ", "there is "]


def plural(word: str) -> str:
    if word.endswith(("s", "x", "ss")):
        return word + "es"
    if word.endswith("sign"):
        return word + "s"
    return word + "s"


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(0, len(options)))]


def caption_for(attributes: dict[str, str], rng: np.random.Generator, always=()) -> str:
    """A caption naming a random subset of the properties, in varied order and wording; the
    properties in ``always`` are always named (the random draws are the same either way)."""
    while True:
        mention = {p: rng.random() < q for p, q in
                   (("shape", 0.8), ("color", 0.65), ("size", 0.7), ("count", 0.7), ("position", 0.7),
                    ("background", 0.55), ("pattern", 0.7))}
        if any(mention.values()):
            break
    for prop in always:
        mention[property_name(prop)] = True
    count = int(attributes["count"])
    noun = _pick(rng, SHAPE_WORDS[attributes["shape"]]) if mention["shape"] else _pick(rng, GENERIC)
    noun = noun if count == 1 else plural(noun)
    adjectives = []
    if mention["size"]:
        adjectives.append(_pick(rng, SIZE_WORDS[attributes["size"]]))
    if mention["color"]:
        adjectives.append(_pick(rng, COLOR_WORDS[attributes["color"]]))
    if mention["count"]:
        det = _pick(rng, COUNT_WORDS[count])
    else:
        det = "a" if count == 1 else _pick(rng, ["", "some", "several"])
    words = [w for w in (det, *adjectives, noun) if w]
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    phrase = " ".join(words)
    position = _pick(rng, POSITION_WORDS[attributes["position"]]) if mention["position"] else ""
    ground = ""
    if mention["background"] or mention["pattern"]:
        parts = []
        if mention["pattern"]:
            parts.append(_pick(rng, PATTERN_WORDS[attributes["pattern"]]))
        if mention["background"]:
            parts.append(_pick(rng, BACKGROUND_WORDS[attributes["background"]]))
        ground = f"{_pick(rng, ['on a', 'against a', 'over a'])} {' '.join(parts)} {_pick(rng, ['background', 'backdrop'])}"
    style = int(rng.integers(0, 4))
    if style == 0 or not (position or ground):
        body = " ".join(w for w in (phrase, position, ground) if w)
    elif style == 1:
        body = " ".join(w for w in (phrase, ground, position) if w)
    elif style == 2 and position:
        return f"{position}, {' '.join(w for w in (phrase, ground) if w)}"
    else:
        lead = ground[0].upper() + ground[1:] if ground else ""
        body = f"{lead}: {' '.join(w for w in (phrase, position) if w)}" if lead else \
            " ".join(w for w in (phrase, position) if w)
        return body
    return (_pick(rng, OPENERS) + body).strip()


def value_phrases(prop: str, rng: np.random.Generator) -> list[str]:
    """One short phrase per value of ``prop`` (in PROPERTIES order), worded at random from the
    caption vocabulary above (synonyms, openers), naming that property alone."""
    prop = property_name(prop)
    noun = _pick(rng, GENERIC)
    opener = _pick(rng, OPENERS)
    if prop == "shape":
        body = [f"a {_pick(rng, SHAPE_WORDS[v])}" for v in SHAPES]
    elif prop == "color":
        body = [f"a {_pick(rng, COLOR_WORDS[v])} {noun}" for v in COLORS]
    elif prop == "size":
        body = [f"a {_pick(rng, SIZE_WORDS[v])} {noun}" for v in SIZES]
    elif prop == "count":
        body = [f"{_pick(rng, COUNT_WORDS[c])} {noun if c == 1 else plural(noun)}" for c in COUNTS]
    elif prop == "position":
        body = [f"a {noun} {_pick(rng, POSITION_WORDS[v])}" for v in POSITIONS]
    else:
        words = BACKGROUND_WORDS if prop == "background" else PATTERN_WORDS
        lead, tail = _pick(rng, ["on a", "against a", "over a"]), _pick(rng, ["background", "backdrop"])
        body = [f"{lead} {_pick(rng, words[v])} {tail}" for v in PROPERTIES[prop]]
        opener = ""
    return [(opener + b.replace("a a", "an a").replace("a e", "an e").replace("a i", "an i")).strip() for b in body]


# ------------------------------------------------------------------ worlds
def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    return {prop: values[int(rng.integers(0, len(values)))] for prop, values in PROPERTIES.items()}


def generate(index: int, seed: int = 0, size: int = IMAGE_SIZE, attributes: dict | None = None,
             mention=(), masks: bool = True) -> ToyImage:
    """Image ``index`` of the world with ``seed`` (deterministic); ``attributes`` fixes some
    properties, the caption always names the properties in ``mention``, and ``masks=False``
    skips the object masks (training needs none)."""
    if index < 0:
        raise ClipInterpretError(f"toy-world image index must be >= 0, got {index}")
    rng = np.random.default_rng([int(seed), int(index)])
    drawn = sample_attributes(rng)
    if attributes:
        for prop, value in attributes.items():
            drawn[property_name(prop)] = check_value(prop, value)
    image, objects, object_masks = render(drawn, rng, size, masks)
    return ToyImage(index, seed, image, drawn, objects, object_masks, caption_for(drawn, rng, mention))


class ToyWorld:
    """``n`` images of the world with ``seed``; indexable, iterable, reproducible."""

    def __init__(self, n: int, seed: int = 0, size: int = IMAGE_SIZE, offset: int = 0):
        if int(n) <= 0:
            raise ClipInterpretError(f"a toy world needs n > 0 images, got {n}")
        self.n, self.seed, self.size, self.offset = int(n), int(seed), int(size), int(offset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> ToyImage:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return generate(self.offset + i, self.seed, self.size)

    def __iter__(self):
        return (self[i] for i in range(self.n))

    @classmethod
    def from_source(cls, source: str) -> "ToyWorld":
        """Parse ``toyworld:N[:seed]``."""
        parts = source.split(":")
        if parts[0] != "toyworld" or len(parts) not in (2, 3):
            raise ClipInterpretError(f"bad toy-world source {source!r}; expected toyworld:N or toyworld:N:SEED")
        try:
            n = int(parts[1])
            seed = int(parts[2]) if len(parts) == 3 else 0
        except ValueError:
            raise ClipInterpretError(f"bad toy-world source {source!r}: N and SEED must be integers") from None
        return cls(n, seed)




def export(out_dir, n: int, seed: int = 0, masks: bool = True, progress: bool = True) -> dict:
    """Write ``n`` images as PNGs plus ``attributes.json`` / ``attributes.csv`` (and mask PNGs).

    A mask PNG holds, per pixel, 0 for background and k for object k (1-based).
    """
    import csv
    import json
    from pathlib import Path

    from tqdm import tqdm

    if int(n) <= 0:
        raise ClipInterpretError(f"--n must be > 0, got {n}")
    out = Path(out_dir)
    from ..runstore.store import ensure_writable_dir

    ensure_writable_dir(out, "export folder")
    (out / "images").mkdir(exist_ok=True)
    if masks:
        (out / "masks").mkdir(exist_ok=True)
    records = []
    for item in tqdm(ToyWorld(n, seed), total=n, desc="exporting toy world", unit="img", disable=not progress):
        name = f"{item.index:06d}.png"
        item.image.save(out / "images" / name)
        record = item.record()
        record["image"] = f"images/{name}"
        if masks:
            labels = np.zeros(item.masks.shape[1:], np.uint8)
            for k, mask in enumerate(item.masks, start=1):
                labels[mask] = k
            Image.fromarray(labels).save(out / "masks" / name)
            record["mask"] = f"masks/{name}"
        records.append(record)
    (out / "attributes.json").write_text(json.dumps({"seed": seed, "n": n, "properties": PROPERTIES,
                                                     "images": records}, indent=1))
    with open(out / "attributes.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask", "caption", *PROPERTIES, "objects"])
        for r in records:
            writer.writerow([r["image"], r.get("mask", ""), r["caption"], *(r["attributes"][p] for p in PROPERTIES),
                             json.dumps(r["objects"])])
    return {"dir": str(out), "n": n, "seed": seed}


def spurious(out_dir, n: int, seed: int, agree: float, core: str = "shape", core_values=("circle", "square"),
             cue: str = "background", cue_values=("white", "black"), progress: bool = True) -> dict:
    """A labelled collection with a spurious cue (a known-answer Waterbirds): image i has the class
    ``core_values[c]`` (c drawn evenly) and the cue ``cue_values[c]`` with probability ``agree``
    (the other value otherwise); every other property is drawn as usual. Writes PNGs and
    ``spurious.csv`` (columns image, <core>, <cue>), an image table that ``index`` reads."""
    import csv
    from pathlib import Path

    from tqdm import tqdm

    core, cue = property_name(core), property_name(cue)
    if core == cue:
        raise ClipInterpretError("the class and the cue must be different properties")
    if len(core_values) != 2 or len(cue_values) != 2:
        raise ClipInterpretError("give two class values and two cue values")
    core_values = [check_value(core, v) for v in core_values]
    cue_values = [check_value(cue, v) for v in cue_values]
    if not 0 <= agree <= 1 or int(n) <= 0:
        raise ClipInterpretError(f"need n > 0 and 0 <= agree <= 1, got n={n}, agree={agree}")
    out = Path(out_dir)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ClipInterpretError(f"cannot write to {out}: {err.strerror or err}") from None
    rows = []
    for i in tqdm(range(int(n)), desc="spurious toy world", unit="img", disable=not progress):
        draw = np.random.default_rng([int(seed), i, 7919])  # apart from the image's own stream
        c = int(draw.integers(2))
        same = bool(draw.random() < agree)
        values = {core: core_values[c], cue: cue_values[c if same else 1 - c]}
        item = generate(i, seed, attributes=values)
        name = f"images/{i:06d}.png"
        item.image.save(out / name)
        rows.append((name, values[core], values[cue]))
    with open(out / "spurious.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", core, cue])
        writer.writerows(rows)
    agreeing = sum(core_values.index(r[1]) == cue_values.index(r[2]) for r in rows)
    return {"table": str(out / "spurious.csv"), "n": int(n), "agreeing": agreeing}
