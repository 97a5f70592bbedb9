"""A small labelled image set with clearly different classes: coloured shapes on random backgrounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = {"circle": (220, 40, 40), "square": (40, 180, 60), "triangle": (40, 70, 220)}


def make_shapes(folder: Path, per_class: int, seed: int, size: int = 64) -> None:
    """``folder/<class>/NNN.png``, the layout ``image_dataset_from_directory`` reads labels from."""
    rng = np.random.default_rng(seed)
    for name, colour in CLASSES.items():
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 256, 3)))
            draw = ImageDraw.Draw(img)
            s = int(rng.integers(size // 4, size * 5 // 8))
            x, y = (int(v) for v in rng.integers(2, size - 2 - s, 2))
            fill = tuple(int(np.clip(v + rng.integers(-30, 30), 0, 255)) for v in colour)
            if name == "circle":
                draw.ellipse((x, y, x + s, y + s), fill=fill)
            elif name == "square":
                draw.rectangle((x, y, x + s, y + s), fill=fill)
            else:
                draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=fill)
            img.save(out / f"{i:03d}.png")
