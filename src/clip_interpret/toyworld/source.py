"""The ``toyworld:N[:seed]`` image source: N generated images labelled with every toy property.

Registered with the run store's sources (``index.sources.register_source``) when the toy
world is imported, so that the store never imports the world that generates its images.
"""

from __future__ import annotations

import numpy as np

from ..runstore.sources import ImageSource, register_source
from .world import PROPERTIES, ToyWorld, sample_attributes

PREFIX = "toyworld:"


def toyworld_source(spec: str) -> ImageSource:
    """``toyworld:N[:seed]`` -> the source of those images, labelled with their attributes."""
    world = ToyWorld.from_source(spec)
    names = [f"toyworld:{world.seed}:{world.offset + i}" for i in range(len(world))]
    labels = {prop: [] for prop in PROPERTIES}
    for i in range(len(world)):
        # the attributes are the first draws of the image's generator: no need to render it
        attributes = sample_attributes(np.random.default_rng([world.seed, world.offset + i]))
        for prop in PROPERTIES:
            labels[prop].append(attributes[prop])
    return ImageSource(spec, names, labels, kind="toyworld", generated=world)


register_source(PREFIX, toyworld_source)
