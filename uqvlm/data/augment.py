"""Deterministic test-time augmentation views of a labelled dataset (for the ``tta`` baseline)."""

from __future__ import annotations

import torch
from PIL import Image

from uqvlm.data.base import ZeroShotDataset, fingerprint_of


class AugmentedView(ZeroShotDataset):
    """View ``view`` of ``base``: each image randomly square-cropped (``scale`` of its area), resized back
    and flipped with probability 1/2, seeded by (seed, view, index) so a view is the same on every run,
    in every worker and in any order."""

    def __init__(
        self, base: ZeroShotDataset, view: int, seed: int = 0, scale: tuple[float, float] = (0.6, 1.0)
    ):
        self.base, self.view, self.seed, self.scale = base, view, seed, tuple(scale)
        self.name, self.split = base.name, base.split
        self.classnames, self.templates = base.classnames, base.templates

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.base[index]
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.view) * 1_000_003 + index) % 2**63)
        w, h = image.size
        area = w * h * float(torch.empty(1).uniform_(*self.scale, generator=g))
        side = max(1, min(w, h, round(area**0.5)))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        image = image.crop((left, top, left + side, top + side)).resize((w, h), Image.BICUBIC)
        if float(torch.rand(1, generator=g)) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return image, label

    def fingerprint(self) -> str:
        return fingerprint_of("tta", self.base.fingerprint(), self.view, self.seed, self.scale)
