"""Proxy image-caption pairs for the shapes world: another mix of visual domains and other caption styles.

The paper estimates the Hessian on LAION-400M (close to the models' pretraining data) and asks whether
proxy data (CC12M) serves as well. The offline twin of that question needs pairs that differ from the
tiny model's pretraining pairs the way CC12M differs from LAION: the same kind of content, drawn from
a shifted mix of domains and captioned in other styles. :class:`ShapesProxyPairs` renders the images of
:class:`~uqvlm.data.shapes.ShapesPairs` (geometry, held-out combinations, milder style variants) with a
``style_mix`` of its own, and replaces each caption by one of :data:`PROXY_CAPTION_STYLES`, none of
which the pretraining captions use. It wraps the shapes world instead of changing it, so the tiny
model's recipe (and its checkpoint) stays as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from uqvlm.data.base import fingerprint_of
from uqvlm.data.shapes import ShapesPairs, _article, _rng

__all__ = ["PROXY_CAPTION_STYLES", "PROXY_STYLE_MIX", "ShapesProxyPairs"]

# Bump when the captions change, so cached features keyed by the fingerprint are invalidated.
PROXY_VERSION = 1

# Caption styles the pretraining captions never use ({a} is the article of the next word).
PROXY_CAPTION_STYLES: dict[str, tuple[str, ...]] = {
    # alt-text / product-listing style: keywords, no sentence
    "alt_text": ("{shape} {color}", "{color} {shape} icon", "{shape} clipart, {color}"),
    # descriptive sentences about the scene
    "descriptive": (
        "there is {a} {color} {shape} in the picture",
        "this image shows a {shape}",
        "{a} {color} {shape} on a plain background",
    ),
    # comma-separated tags
    "tags": ("{shape}, {color}, graphic", "shape: {shape}; colour: {color}"),
}

# Shifted toward the corrupted domains, away from the clean one (the pretraining pairs are 55% clean).
PROXY_STYLE_MIX: dict[str, float] = {
    "photo": 0.15,
    "sketch": 0.15,
    "noisy": 0.3,
    "lowcontrast": 0.25,
    "blur": 0.15,
}


class ShapesProxyPairs(ShapesPairs):
    """Shapes-world pairs with a shifted ``style_mix`` (default :data:`PROXY_STYLE_MIX`) and captions in
    ``caption_styles`` (keys of :data:`PROXY_CAPTION_STYLES`), chosen per pair from a seeded RNG."""

    def __init__(
        self,
        split: str = "hessian",
        n: int = 6000,
        seed: int = 1,
        image_size: int = 32,
        style_mix: dict[str, float] | None = None,
        caption_styles: Sequence[str] = tuple(PROXY_CAPTION_STYLES),
    ) -> None:
        styles = list(caption_styles)
        if not styles:
            raise ValueError("caption_styles must name at least one caption style")
        if unknown := sorted(set(styles) - set(PROXY_CAPTION_STYLES)):
            raise ValueError(f"unknown caption styles {unknown}; known: {', '.join(PROXY_CAPTION_STYLES)}")
        super().__init__(
            split=split,
            n=n,
            seed=seed,
            image_size=image_size,
            style_mix=PROXY_STYLE_MIX if style_mix is None else style_mix,
        )
        self.caption_styles = styles
        self._templates = [t for s in styles for t in PROXY_CAPTION_STYLES[s]]
        self.name = f"shapes-proxy-pairs-{split}"

    def caption(self, index: int) -> str:
        """The proxy caption of item ``index`` (without rendering the image)."""
        shape, color, _style = self.item_info(index)
        rng = _rng("proxy-caption", self.seed, self.split, index)
        template = self._templates[int(rng.integers(len(self._templates)))]
        return template.format(a=_article(color), color=color, shape=shape)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        image, _ = super().__getitem__(index)
        return image, self.caption(index)

    def fingerprint(self) -> str:
        return fingerprint_of("shapes-proxy-pairs", PROXY_VERSION, super().fingerprint(), self.caption_styles)
