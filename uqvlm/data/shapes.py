"""The offline "shapes" world: procedurally drawn, captioned images of coloured shapes.

Every item is rendered on demand from an RNG seeded by ``(seed, kind, split, index)``, so datasets are
random-access, order-independent and reproducible without any files. The same index in different
domains of a zero-shot split shows the same shape, colour, size, position and rotation: only the style
(background, outline, noise, contrast, blur) differs, so domains are paired.

Pairs (pretraining and Hessian data) are 55% clean; the rest are style variants of random, *milder*
severity (:data:`PAIR_STYLE_MIX`). The evaluation domains use *stronger* versions of the same shifts,
so a model pretrained on the pairs stays above chance on them but is less accurate (and overconfident)
there. A model trained on clean images only falls to chance on such shifts.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from uqvlm.data.base import PairDataset, ZeroShotDataset, fingerprint_of

# Bump when rendering changes, so cached features keyed by the fingerprint are invalidated.
RENDER_VERSION = 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "bolt", "crescent")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 165, 45),
    "blue": (35, 70, 225),
    "yellow": (235, 205, 20),
    "orange": (245, 130, 20),
    "purple": (135, 45, 185),
    "pink": (245, 110, 185),
    "cyan": (20, 200, 210),
}

# Shape-colour combinations never shown in pretraining/Hessian pairs (one per shape and per colour);
# the zero-shot sets draw colours uniformly, so they contain them.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "cyan"),
    ("star", "green"),
    ("cross", "pink"),
    ("heart", "blue"),
    ("bolt", "red"),
    ("crescent", "yellow"),
)

ALLOWED_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (s, c) for s in SHAPES for c in COLORS if (s, c) not in frozenset(HELD_OUT)
)

DOMAINS: tuple[str, ...] = ("photo", "sketch", "noisy", "lowcontrast", "blur")
SHIFTED_DOMAINS: tuple[str, ...] = tuple(d for d in DOMAINS if d != "photo")

# Pair styles and their probabilities: mostly clean, plus milder versions of each shift (sketches
# get more because outlines are the furthest from filled shapes).
PAIR_STYLE_MIX: dict[str, float] = {
    "photo": 0.55,
    "sketch": 0.15,
    "noisy": 0.1,
    "lowcontrast": 0.1,
    "blur": 0.1,
}

ZEROSHOT_TEMPLATES: tuple[str, ...] = ("a photo of a {c}", "a {c}")

# Caption templates for pairs; {a} is the article matching the next word.
_CAPTIONS: tuple[str, ...] = (
    "{a} {color} {shape}",
    "a photo of {a} {color} {shape}",
    "a {shape}",
    "a photo of a {shape}",
    "{a} {size} {color} {shape}",
    "a picture of {a} {color} {shape}",
    "an image of a {shape}",
)
_DRAWING_CAPTIONS: tuple[str, ...] = (
    "a drawing of {a} {color} {shape}",
    "a drawing of a {shape}",
    "a sketch of a {shape}",
    "{a} {color} {shape}",
)

_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled for anti-aliasing


@dataclass(frozen=True)
class _Style:
    """Parameters of one visual style (a domain at a given severity)."""

    outline: float = 0.0  # outline width as a fraction of the radius; 0 = filled
    fill: float = 0.0  # opacity of the interior when drawing an outline (a light colour wash)
    blotch: float = 0.0  # amplitude (0..1) of the coloured low-frequency background texture
    noise: float = 0.0  # std of per-pixel Gaussian noise, in 0..255 units
    contrast: float = 1.0  # opacity of the shape over the background
    gray_bg: bool = False  # mid-grey instead of near-white background
    blur: float = 0.0  # Gaussian blur radius in pixels at 32 px (scaled with image size)


# Evaluation domains: fixed, strong shifts.
_EVAL_STYLES: dict[str, _Style] = {
    "photo": _Style(),
    "sketch": _Style(outline=0.2, fill=0.2),
    "noisy": _Style(blotch=0.6, noise=25.0),
    "lowcontrast": _Style(contrast=0.35, gray_bg=True),
    "blur": _Style(blur=1.8),
}
# Pretraining variants: a random severity u ~ U(0, 1) between the clean style and these, all milder
# than the evaluation domains (sketches thicker, noise weaker, contrast higher, blur smaller).
_PAIR_STYLES_MAX: dict[str, _Style] = {
    "photo": _Style(),
    "sketch": _Style(outline=0.22),
    "noisy": _Style(blotch=0.5, noise=20.0),
    "lowcontrast": _Style(contrast=0.5, gray_bg=True),
    "blur": _Style(blur=1.0),
}


def _pair_style(name: str, u: float) -> _Style:
    top = _PAIR_STYLES_MAX[name]
    if name == "sketch":  # outlines from very thick (almost filled) down to the thinnest pair outline
        return replace(top, outline=top.outline + (1 - u) * 0.4)
    return _Style(
        outline=0.0,
        blotch=u * top.blotch,
        noise=u * top.noise,
        contrast=1 - u * (1 - top.contrast),
        gray_bg=top.gray_bg,
        blur=u * top.blur,
    )


def list_domains() -> list[str]:
    """Names of the visual domains; ``photo`` is the clean one."""
    return list(DOMAINS)


def _rng(*key: object) -> np.random.Generator:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _unit_polygon(shape: str) -> np.ndarray:
    """Outline of a shape as [k, 2] points, roughly inside the unit disc, y pointing down."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "triangle":
        t = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(t), np.sin(t) + 0.15], 1)
    if shape == "star":
        t = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(t), r * np.sin(t) + 0.08], 1)
    if shape == "cross":
        w = 0.3
        return np.array(
            [
                [-w, -1],
                [w, -1],
                [w, -w],
                [1, -w],
                [1, w],
                [w, w],
                [w, 1],
                [-w, 1],
                [-w, w],
                [-1, w],
                [-1, -w],
                [-w, -w],
            ]
        )
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x / 17, -(y + 2.5) / 17], 1)
    if shape == "bolt":  # a lightning bolt
        return np.array(
            [[0.2, -1.0], [-0.6, 0.15], [-0.05, 0.15], [-0.3, 1.0], [0.6, -0.2], [0.05, -0.2], [0.5, -1.0]]
        )
    if shape == "crescent":
        # Unit disc minus a disc of radius rin centred at (d, 0): outer arc, then inner arc back.
        d, rin = 0.5, 0.85
        xi = (1 + d * d - rin * rin) / (2 * d)  # x of the two circle intersections
        yi = math.sqrt(1 - xi * xi)
        t0 = math.atan2(yi, xi)
        p0 = math.atan2(yi, xi - d)
        t = np.linspace(t0, 2 * np.pi - t0, 32)
        p = np.linspace(2 * np.pi - p0, p0, 24)
        outer = np.stack([np.cos(t), np.sin(t)], 1)
        inner = np.stack([d + rin * np.cos(p), rin * np.sin(p)], 1)
        return np.concatenate([outer, inner]) + np.array([0.3, 0.0])
    raise ValueError(f"unknown shape {shape!r}")


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}


@dataclass(frozen=True)
class _Geometry:
    shape: str
    color: str
    radius: float  # fraction of the image size
    cx: float
    cy: float
    angle: float  # radians
    rgb: tuple[int, int, int]


def _sample_geometry(rng: np.random.Generator, shape: str, color: str) -> _Geometry:
    radius = rng.uniform(0.22, 0.40)
    margin = radius + 0.03
    cx, cy = rng.uniform(margin, 1 - margin, size=2)
    angle = np.deg2rad(rng.uniform(-30, 30))
    jitter = rng.integers(-15, 16, size=3)
    rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
    return _Geometry(shape, color, float(radius), float(cx), float(cy), float(angle), rgb)


def _shape_mask(geo: _Geometry, size: int, outline: float, fill: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the shape (or its outline over a ``fill`` wash), [size, size]."""
    big = size * _SUPERSAMPLE
    c, s = math.cos(geo.angle), math.sin(geo.angle)
    pts = _POLYGONS[geo.shape] @ np.array([[c, s], [-s, c]])
    pts = (pts * geo.radius + np.array([geo.cx, geo.cy])) * big
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    xy = [tuple(p) for p in pts.tolist()]
    if outline > 0:
        if fill > 0:
            draw.polygon(xy, fill=round(255 * fill))
        width = max(_SUPERSAMPLE, round(outline * geo.radius * big))
        draw.line(xy + [xy[0], xy[1]], fill=255, width=width, joint="curve")
    else:
        draw.polygon(xy, fill=255)
    mask = mask.resize((size, size), Image.Resampling.BOX)
    return np.asarray(mask, dtype=np.float32) / 255.0


def _render(geo: _Geometry, style: _Style, rng: np.random.Generator, size: int) -> Image.Image:
    """Composite the shape over a style-dependent background; ``rng`` drives only the style."""
    if style.gray_bg:
        bg = np.full((size, size, 3), rng.uniform(105, 165), dtype=np.float32)
        bg += rng.uniform(-12, 12, size=3).astype(np.float32)  # slight tint
    else:
        bg = np.full((size, size, 3), rng.uniform(220, 255), dtype=np.float32)
        bg += rng.uniform(-8, 8, size=3).astype(np.float32)
    if style.blotch > 0:
        # Low-frequency random colour field, upsampled: a textured background.
        cells = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(cells).resize((size, size), Image.Resampling.BICUBIC), np.float32)
        bg = (1 - style.blotch) * bg + style.blotch * field
    alpha = _shape_mask(geo, size, style.outline, style.fill)[..., None] * style.contrast
    img = bg * (1 - alpha) + np.array(geo.rgb, dtype=np.float32) * alpha
    if style.noise > 0:
        img += rng.normal(0, style.noise, size=img.shape).astype(np.float32)
    out = Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")
    if style.blur > 0:
        out = out.filter(ImageFilter.GaussianBlur(style.blur * size / 32))
    return out


def _caption(rng: np.random.Generator, geo: _Geometry, drawing: bool) -> str:
    templates = _DRAWING_CAPTIONS if drawing else _CAPTIONS
    template = templates[int(rng.integers(len(templates)))]
    if "{size}" in template:
        size = "small" if geo.radius < 0.29 else "large" if geo.radius > 0.33 else None
        if size is None:
            template = template.replace("{size} ", "")
    else:
        size = ""
    first = size or geo.color  # the word right after {a}
    return template.format(a=_article(first), size=size, color=geo.color, shape=geo.shape)


class ShapesPairs(PairDataset):
    """Captioned shape images for pretraining (``split="pretrain"``) and Hessian estimation (``"hessian"``).

    Never shows a :data:`HELD_OUT` combination. A fraction of images use mild style variants
    (``style_mix``, default :data:`PAIR_STYLE_MIX`); pass ``{"photo": 1.0}`` for clean images only.
    """

    def __init__(
        self,
        split: str = "pretrain",
        n: int = 20_000,
        seed: int = 0,
        image_size: int = 32,
        style_mix: dict[str, float] | None = None,
    ) -> None:
        mix = dict(PAIR_STYLE_MIX if style_mix is None else style_mix)
        if unknown := set(mix) - set(DOMAINS):
            raise ValueError(f"unknown styles {sorted(unknown)}")
        total = sum(mix.values())
        self.split, self.n, self.seed, self.image_size = split, n, seed, image_size
        self.style_mix = {k: v / total for k, v in mix.items()}
        self._styles = list(self.style_mix)
        self._cum = np.cumsum([self.style_mix[k] for k in self._styles])
        self.name = f"shapes-pairs-{split}"

    def __len__(self) -> int:
        return self.n

    def item_info(self, index: int) -> tuple[str, str, str]:
        """``(shape, colour, style)`` of an item, without rendering it."""
        geo, style, _, _ = self._sample(index)
        return geo.shape, geo.color, style

    def _sample(self, index: int) -> tuple[_Geometry, str, np.random.Generator, str]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        rng = _rng("pairs", self.seed, self.split, index)
        shape, color = ALLOWED_COMBOS[int(rng.integers(len(ALLOWED_COMBOS)))]
        geo = _sample_geometry(rng, shape, color)
        style = self._styles[min(int(np.searchsorted(self._cum, rng.uniform())), len(self._styles) - 1)]
        caption = _caption(rng, geo, drawing=style == "sketch")
        return geo, style, rng, caption

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        geo, style, rng, caption = self._sample(index)
        return _render(geo, _pair_style(style, rng.uniform()), rng, self.image_size), caption

    def fingerprint(self) -> str:
        return fingerprint_of(
            "shapes-pairs", RENDER_VERSION, self.split, self.n, self.seed, self.image_size, self.style_mix
        )


class ShapesZeroShot(ZeroShotDataset):
    """Labelled shape images of one domain; the label is the shape, colours are uniform over all 8.

    Classes are balanced (``label = index % 8``). Splits ``train``/``val``/``test`` hold distinct images;
    the same ``(split, index, seed)`` gives the same geometry in every domain.
    """

    SPLITS = ("train", "val", "test")

    def __init__(
        self,
        domain: str = "photo",
        split: str = "test",
        n: int = 1_000,
        seed: int = 0,
        image_size: int = 32,
        templates: list[str] | None = None,
    ) -> None:
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {self.SPLITS}")
        self.domain, self.split, self.n, self.seed, self.image_size = domain, split, n, seed, image_size
        self.name = f"shapes-{domain}"
        self.classnames = list(SHAPES)
        self.templates = list(ZEROSHOT_TEMPLATES if templates is None else templates)

    def __len__(self) -> int:
        return self.n

    def item_info(self, index: int) -> tuple[str, str]:
        """``(shape, colour)`` of an item, without rendering it."""
        geo = self._geometry(index)
        return geo.shape, geo.color

    def _geometry(self, index: int) -> _Geometry:
        if not 0 <= index < self.n:
            raise IndexError(index)
        rng = _rng("zeroshot", self.seed, self.split, index)
        shape = SHAPES[index % len(SHAPES)]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        return _sample_geometry(rng, shape, color)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        geo = self._geometry(index)
        style_rng = _rng("zeroshot-style", self.seed, self.split, self.domain, index)
        img = _render(geo, _EVAL_STYLES[self.domain], style_rng, self.image_size)
        return img, index % len(SHAPES)

    def fingerprint(self) -> str:
        return fingerprint_of(
            "shapes-zeroshot",
            RENDER_VERSION,
            self.domain,
            self.split,
            self.n,
            self.seed,
            self.image_size,
            self.templates,
        )
