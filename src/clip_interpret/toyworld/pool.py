"""The toy description pool: short descriptions of each property value, tagged.

Each entry is ``(property, value, description)``. Later steps use it as ground
truth: a head labelled "color" should pick colour descriptions, and mean
ablating it should hurt colour accuracy most.
"""

from __future__ import annotations

from .world import PROPERTIES

_COLOR = {
    "red": ["crimson", "scarlet"], "orange": ["amber", "tangerine"], "yellow": ["golden", "lemon yellow"],
    "green": ["emerald", "leafy green"], "blue": ["azure", "cobalt"], "purple": ["violet", "lilac"],
    "pink": ["rose", "pinkish"], "brown": ["chocolate", "brownish"],
}
_SHAPE = {
    "circle": ["a circle", "a round shape", "a disc", "circular objects"],
    "square": ["a square", "a box shape", "squares", "a square block"],
    "triangle": ["a triangle", "a triangular shape", "triangles", "a pointed triangle"],
    "star": ["a star", "a star shape", "stars", "a five-pointed star"],
    "cross": ["a cross", "a plus sign", "crosses", "a plus-shaped object"],
    "diamond": ["a diamond", "a rhombus", "diamonds", "a diamond shape"],
}
_SIZE = {
    "small": ["a small object", "tiny shapes", "little items", "something small"],
    "large": ["a large object", "big shapes", "huge items", "something large"],
}
_COUNT = {
    "1": ["one item", "a single object", "a lone shape", "just one thing"],
    "2": ["two items", "a pair of objects", "two shapes", "a couple of things"],
    "3": ["three items", "a trio of objects", "three shapes", "a group of three things"],
}
_POSITION = {
    "top left": ["an object in the top left", "something in the upper left corner", "top left", "the upper left"],
    "top right": ["an object in the top right", "something in the upper right corner", "top right",
                  "the upper right"],
    "bottom left": ["an object in the bottom left", "something in the lower left corner", "bottom left",
                    "the lower left"],
    "bottom right": ["an object in the bottom right", "something in the lower right corner", "bottom right",
                     "the lower right"],
    "center": ["an object in the center", "something in the middle", "the centre of the image", "centered"],
}
_BACKGROUND = {
    "white": ["a white background", "a white backdrop", "on white", "a pale white ground"],
    "black": ["a black background", "a black backdrop", "on black", "a dark black ground"],
    "gray": ["a gray background", "a grey backdrop", "on gray", "a neutral gray ground"],
    "beige": ["a beige background", "a sand-colored backdrop", "on beige", "a sandy beige ground"],
    "teal": ["a teal background", "a teal backdrop", "on teal", "a dark teal ground"],
}
_PATTERN = {
    "plain": ["a plain background", "a solid backdrop", "no pattern", "a uniform surface"],
    "stripes": ["a striped background", "stripes", "a stripy pattern", "lines across the background"],
    "dots": ["a dotted background", "polka dots", "a dotted pattern", "spots on the background"],
    "checkers": ["a checkered background", "a checkerboard", "a checkered pattern", "a grid of squares"],
    "noise": ["a noisy background", "grainy noise", "a speckled texture", "random noise"],
}


def toy_pool() -> list[tuple[str, str, str]]:
    """All ``(property, value, description)`` entries, every property value covered."""
    entries: list[tuple[str, str, str]] = []
    for value in PROPERTIES["color"]:
        entries += [("color", value, text) for text in
                    (f"a {value} object", f"something {_COLOR[value][0]}", f"a {value} shape",
                     f"{_COLOR[value][1]} things")]
    for prop, table in (("shape", _SHAPE), ("size", _SIZE), ("count", _COUNT), ("position", _POSITION),
                        ("background", _BACKGROUND), ("pattern", _PATTERN)):
        for value in PROPERTIES[prop]:
            entries += [(prop, value, text) for text in table[value]]
    return entries


def pool_lines() -> list[str]:
    """The pool as ``category<TAB>description`` lines (the pool-file format)."""
    return [f"{prop}\t{text}" for prop, _, text in toy_pool()]
