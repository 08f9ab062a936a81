"""Printed characters rendered from the fonts matplotlib ships: a synthetic source domain.

Training on rendered print and transferring to real handwriting is a real use of transfer
learning, and it needs no download. Each font (DejaVu, STIX, Computer Modern) renders every
character several times with random rotation, shear, scale and stroke width. Glyphs are drawn
into a 32 x 32 binary bitmap, the same preprocessing the UCI digits (scikit-learn's `digits`)
used before their 4 x 4 block counts; `prepare` then resizes with area averaging.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

VARIANTS_PER_GLYPH = 40
CANVAS = 96  # render big, then crop and shrink: smooth edges before binarising
BITMAP = 32
# These map the code points of digits and letters to symbols (brackets, arrows, placeholders).
SYMBOL_FONTS = {"cmex10", "cmsy10", "LastResortHE-Regular"}


@lru_cache(maxsize=256)  # opening every font file costs ms, and zero-shot asks for each glyph of each class
def font_files(chars: str) -> tuple[Path, ...]:
    """matplotlib's TrueType fonts that have a distinct glyph for every character."""
    import matplotlib
    from matplotlib.ft2font import FT2Font

    fonts = []
    for path in sorted(Path(matplotlib.get_data_path(), "fonts", "ttf").glob("*.ttf")):
        font = FT2Font(str(path))
        if path.stem in SYMBOL_FONTS:
            continue
        if all(font.get_char_index(ord(c)) for c in chars):
            fonts.append(path)
    return tuple(fonts)


def _glyph(font, char: str, rng: np.random.Generator) -> np.ndarray | None:
    from PIL import Image, ImageDraw

    img = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(img)
    stroke = int(rng.integers(0, 3))
    draw.text((CANVAS // 2, CANVAS // 2), char, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
    shear = rng.uniform(-0.3, 0.3)
    img = img.transform(img.size, Image.AFFINE, (1, shear, -shear * CANVAS / 2, 0, 1, 0), resample=Image.BILINEAR)
    img = img.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
    box = img.getbbox()
    if box is None:
        return None
    glyph = img.crop(box)
    # Fit the glyph's height to the bitmap (digits are size-normalised), width by aspect.
    w, h = glyph.size
    height = int(round(BITMAP * rng.uniform(0.8, 1.0)))
    width = max(1, min(BITMAP, int(round(w * height / h * rng.uniform(0.85, 1.15)))))
    glyph = glyph.resize((width, height), Image.LANCZOS)
    canvas = Image.new("L", (BITMAP, BITMAP), 0)
    canvas.paste(glyph, ((BITMAP - width) // 2, (BITMAP - height) // 2))
    return (np.asarray(canvas) >= 96).astype(np.uint8) * 255


@lru_cache(maxsize=2)
def render_characters(chars: str, variants: int = VARIANTS_PER_GLYPH, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, N x 1 x 32 x 32) and labels (index into `chars`). Deterministic for a seed."""
    from PIL import ImageFont

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for path in font_files(chars):
        # Pillow's basic layout, always: with libraqm installed (it is on some hosts, not in the
        # image) Pillow lays text out otherwise, and the same seed drew other glyphs.
        font = ImageFont.truetype(str(path), size=64, layout_engine=ImageFont.Layout.BASIC)
        for label, char in enumerate(chars):
            for _ in range(variants):
                bitmap = _glyph(font, char, rng)
                if bitmap is not None:
                    images.append(bitmap)
                    labels.append(label)
    return np.stack(images)[:, None], np.asarray(labels, dtype=np.int64)
