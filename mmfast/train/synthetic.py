"""The embedded default data set: procedurally rendered scenes with compositional captions.

Each sample is a small scene on a plain background: one to three groups of identical objects,
each group in its own quadrant, described by a grammar:

    caption = group ("," group)* ["and" group] "on a" BG "background"
    group   = COUNT SIZE COLOUR SHAPE[s] "in the" QUADRANT
    e.g.    "two small red circles in the top left and one large blue square in the bottom right
             on a grey background"

Groups are listed in quadrant order (top left, top right, bottom left, bottom right), so every
scene has exactly one caption. With 3 counts x 2 sizes x 8 colours x 5 shapes per group, 3
backgrounds and 1-3 groups over 4 quadrants there are about 10^8 captions, so held-out captions
are nearly unique, while every caption word is grounded in pixels (retrieval is learnable but
needs colour, shape, size, count and position).

A scene is a flat dict of ints (its *attributes*): "bg", and per quadrant q in 0..3
"q{q}_count" (0 = empty quadrant, else 1..3), "q{q}_size", "q{q}_colour", "q{q}_shape" (-1 when
empty). ``caption(attrs)`` renders any attribute dict, so a caption that differs from the true one
in exactly one attribute (a hard negative, or a zero-shot class prompt) is one dict edit away.

Sample i of split s under seed k is drawn from ``numpy.random.default_rng((k, s, i))``: the data
set is deterministic, random-access, and the same on every rank and every run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "ATTRIBUTES",
    "SPLITS",
    "SyntheticScenes",
    "caption",
    "edit_one_attribute",
    "render",
    "sample_attributes",
    "vocabulary",
]

COUNTS = ("one", "two", "three")
SIZES = ("small", "large")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {"black": (15, 15, 15), "grey": (110, 110, 110), "brown": (100, 65, 35)}
GROUP_COUNT_P = (0.1, 0.5, 0.4)  # P(1, 2, 3 groups)
SPLITS = {"train": 0, "val": 1, "test": 2}

# Attribute name -> its class names (the zero-shot tasks and the hard-negative axes).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "bg": tuple(BACKGROUNDS),
    "count": COUNTS,
    "size": SIZES,
    "colour": tuple(COLOURS),
    "shape": SHAPES,
}
_GROUP_KEYS = ("count", "size", "colour", "shape")


def vocabulary() -> list[str]:
    """Every word the grammar can produce (sorted): the word tokenizer's vocabulary."""
    words = {"in", "the", "and", "on", "a", "background", ","}
    words.update(COUNTS, SIZES, COLOURS, SHAPES, PLURALS.values(), BACKGROUNDS)
    for q in QUADRANTS:
        words.update(q.split())
    return sorted(words)


def sample_attributes(rng: np.random.Generator) -> dict[str, int]:
    """A random scene's attributes (see the module docstring for the keys)."""
    attrs = {"bg": int(rng.integers(len(BACKGROUNDS)))}
    n_groups = int(rng.choice(3, p=GROUP_COUNT_P)) + 1
    occupied = set(rng.choice(4, size=n_groups, replace=False).tolist())
    for q in range(4):
        if q in occupied:
            attrs[f"q{q}_count"] = int(rng.integers(len(COUNTS))) + 1
            attrs[f"q{q}_size"] = int(rng.integers(len(SIZES)))
            attrs[f"q{q}_colour"] = int(rng.integers(len(COLOURS)))
            attrs[f"q{q}_shape"] = int(rng.integers(len(SHAPES)))
        else:
            attrs[f"q{q}_count"] = 0
            for key in _GROUP_KEYS[1:]:
                attrs[f"q{q}_{key}"] = -1
    return attrs


def _group_phrase(attrs: Mapping[str, int], q: int) -> str:
    count = int(attrs[f"q{q}_count"])
    shape = SHAPES[int(attrs[f"q{q}_shape"])]
    noun = shape if count == 1 else PLURALS[shape]
    colour = tuple(COLOURS)[int(attrs[f"q{q}_colour"])]
    return f"{COUNTS[count - 1]} {SIZES[int(attrs[f'q{q}_size'])]} {colour} {noun} in the {QUADRANTS[q]}"


def caption(attrs: Mapping[str, int | torch.Tensor]) -> str:
    """The grammar's caption of a scene (attributes as ints or 0-dim tensors)."""
    groups = [_group_phrase(attrs, q) for q in range(4) if int(attrs[f"q{q}_count"]) > 0]
    if not groups:
        raise ValueError("a scene needs at least one group (every q*_count is 0)")
    body = groups[0] if len(groups) == 1 else " , ".join(groups[:-1]) + " and " + groups[-1]
    return f"{body} on a {tuple(BACKGROUNDS)[int(attrs['bg'])]} background"


def edit_one_attribute(attrs: Mapping[str, int], rng: np.random.Generator) -> tuple[dict[str, int], str]:
    """A copy of a scene's attributes with exactly one attribute changed, and that attribute's name.

    The attribute is drawn uniformly from ``ATTRIBUTES`` (the background, or the count, size, colour
    or shape of one occupied quadrant drawn uniformly), its new value uniformly from the others.
    Every attribute is named in the caption, so ``caption`` of the result differs from the scene's
    own: a negative caption that only fusion of the two modalities can tell from the true one.
    """
    out = {k: int(v) for k, v in attrs.items()}
    name = tuple(ATTRIBUTES)[int(rng.integers(len(ATTRIBUTES)))]
    if name == "bg":
        key, offset = "bg", 0
    else:
        occupied = [q for q in range(4) if out[f"q{q}_count"] > 0]
        if not occupied:
            raise ValueError("a scene needs at least one group (every q*_count is 0)")
        key, offset = f"q{int(rng.choice(occupied))}_{name}", 1 if name == "count" else 0
    n = len(ATTRIBUTES[name])
    shift = int(rng.integers(1, n))  # 1 .. n-1: never the current value
    out[key] = (out[key] - offset + shift) % n + offset
    return out, name


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # cross
        w = r * 0.38
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)


def render(attrs: Mapping[str, int], size: int, rng: np.random.Generator, supersample: int = 2) -> Image.Image:
    """Draw a scene as a ``size`` x ``size`` RGB image.

    Each quadrant is split into 2 x 2 cells; a group of k objects takes k distinct cells, each
    object centred in its cell with a random jitter that keeps it inside (objects never overlap).
    Drawn at ``supersample`` times the size and reduced with a box filter (anti-aliasing).
    """
    big = size * supersample
    img = Image.new("RGB", (big, big), tuple(BACKGROUNDS.values())[int(attrs["bg"])])
    draw = ImageDraw.Draw(img)
    cell = big / 4
    for q in range(4):
        count = int(attrs[f"q{q}_count"])
        if count == 0:
            continue
        radius = cell * (0.26 if int(attrs[f"q{q}_size"]) == 0 else 0.44)
        fill = tuple(COLOURS.values())[int(attrs[f"q{q}_colour"])]
        shape = SHAPES[int(attrs[f"q{q}_shape"])]
        qx, qy = (q % 2) * 2 * cell, (q // 2) * 2 * cell
        for c in rng.choice(4, size=count, replace=False).tolist():
            slack = cell / 2 - radius
            cx = qx + (c % 2 + 0.5) * cell + rng.uniform(-slack, slack)
            cy = qy + (c // 2 + 0.5) * cell + rng.uniform(-slack, slack)
            _draw_shape(draw, shape, cx, cy, radius, fill)
    return img.resize((size, size), Image.Resampling.BOX) if supersample > 1 else img


class SyntheticScenes(torch.utils.data.Dataset):
    """Random-access procedural scenes: ``ds[i]`` -> {"image": uint8 (3, S, S), "caption": str,
    "captions": [caption], "attrs": {name: int}, "index": i}.

    Args:
        split: "train", "val" or "test" (disjoint random streams of the same distribution).
        length: number of samples (the training stream can be as long as wanted: sample i is
            generated on demand, never stored).
        seed: the data seed; (seed, split, i) fixes sample i.
        image_size: side of the square image in pixels.
    """

    def __init__(self, split: str, length: int, *, seed: int = 0, image_size: int = 48) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        self.split, self.length, self.seed, self.image_size = split, int(length), int(seed), int(image_size)

    def __len__(self) -> int:
        return self.length

    def attributes(self, index: int) -> dict[str, int]:
        """Sample ``index``'s attributes (no rendering)."""
        return sample_attributes(self._rng(index))

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        return np.random.default_rng((self.seed, SPLITS[self.split], int(index)))

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        attrs = sample_attributes(rng)
        image = render(attrs, self.image_size, rng)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
        text = caption(attrs)
        return {"image": pixels, "caption": text, "captions": [text], "attrs": attrs, "index": int(index)}

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(self.length))
