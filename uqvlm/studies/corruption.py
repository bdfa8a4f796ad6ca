"""Robustness to image corruption: additive Gaussian pixel noise, as the published code defines it.

The published ``corruption_transform`` (AaltoML/BayesVLM ``bayesvlm/data/common.py``) is
``Resize, CenterCrop, RGB, ToTensor, AddGaussianNoise(std), Normalize``, with
``AddGaussianNoise(x) = clamp(x + std * randn_like(x) + mean, 0, 1)``: noise on the [0, 1] image
*after* resizing and *before* normalisation. Here the same noise goes between the ``ToTensor`` and the
``Normalize`` of the model's own preprocessing, drawn from a generator seeded by (seed, image index)
instead of the global RNG, so a corrupted dataset is the same on every run, in every worker.

How the index reaches the transform: :class:`CorruptedView` wraps a dataset and returns
:class:`NoisyImage` items (the PIL image, the noise std and the image's own seed);
:func:`corrupted_preprocess` wraps the model's preprocessing so that it adds the noise a
:class:`NoisyImage` asks for (plain PIL images pass through unchanged). Used together:

    view = CorruptedView(dataset, std=0.2, seed=0)            # fingerprint keys std and seed
    vlm.preprocess = corrupted_preprocess(vlm.preprocess)     # repr differs from the clean one
    extract(vlm, view, ..., dataset_id=view.fingerprint())

A :class:`NoisyImage` given to the plain preprocessing fails loudly (torchvision refuses it), so the
pair cannot silently produce clean features under a corrupted cache key.

The study then reads the posterior's ProbCosine of each image with its TRUE class
(:func:`true_class_similarity`, :func:`similarity_stats`): the paper's claim is that the mean similarity
falls and its variance rises as the noise grows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import Compose, Normalize, ToTensor

from uqvlm.data.base import ZeroShotDataset, fingerprint_of
from uqvlm.errors import UqvlmError
from uqvlm.plots import _save, plt
from uqvlm.validation import check_tensor

__all__ = [
    "CorruptedPreprocess",
    "CorruptedView",
    "NoisyImage",
    "UnsupportedPreprocessError",
    "add_gaussian_noise",
    "corrupted_preprocess",
    "image_seed",
    "noise_generator",
    "plot_metrics_vs_noise",
    "plot_similarity_vs_noise",
    "similarity_stats",
    "split_preprocess",
    "true_class_similarity",
]


class UnsupportedPreprocessError(UqvlmError, ValueError):
    """The model's preprocessing has no ToTensor immediately followed by Normalize to put noise between."""


# -------------------------------------------------------------------------------------- the noise


def add_gaussian_noise(
    pixels01: Tensor, std: float, generator: torch.Generator | None = None, mean: float = 0.0
) -> Tensor:
    """The published ``AddGaussianNoise``: clamp(x + N(mean, std^2) noise, 0, 1), elementwise.

    ``pixels01``: an image tensor in [0, 1] (ToTensor's output, before Normalize). ``generator`` must
    live on the tensor's device. std = 0 (and mean = 0) returns the input's values unchanged.
    """
    if not pixels01.is_floating_point():
        raise ValueError(f"pixels01 must be a floating-point tensor in [0, 1], got {pixels01.dtype}")
    if not std >= 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if std == 0:
        return (pixels01 + mean).clamp_(0.0, 1.0)
    noise = torch.randn(pixels01.shape, generator=generator, dtype=pixels01.dtype, device=pixels01.device)
    return (pixels01 + noise.mul_(std).add_(mean)).clamp_(0.0, 1.0)


def noise_generator(seed: int) -> torch.Generator:
    """A CPU generator for one image's noise."""
    return torch.Generator().manual_seed(seed % 2**63)


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` (mixed as :class:`uqvlm.data.augment.AugmentedView` does). It does not
    depend on std: every noise level scales the same standard-normal draw (common random numbers), so the
    curves over std compare like with like."""
    return (seed * 1_000_003 + index) % 2**63


# ---------------------------------------------------------------------------- in the preprocessing


def split_preprocess(preprocess: Callable) -> tuple[Compose, Compose]:
    """Split a torchvision ``Compose`` into (up to and including ToTensor, Normalize and the rest).

    open_clip's preprocessing ends with ``MaybeToTensor`` (a ToTensor) then ``Normalize``; exactly one
    of each, adjacent, is required, else :class:`UnsupportedPreprocessError`.
    """
    transforms = getattr(preprocess, "transforms", None)
    if not isinstance(preprocess, Compose) or not isinstance(transforms, list):
        raise UnsupportedPreprocessError(
            f"the model's preprocess is a {type(preprocess).__name__}, not a torchvision Compose: "
            "cannot insert pixel noise between ToTensor and Normalize"
        )
    to_tensor = [i for i, t in enumerate(transforms) if isinstance(t, ToTensor)]
    normalize = [i for i, t in enumerate(transforms) if isinstance(t, Normalize)]
    names = [type(t).__name__ for t in transforms]
    if len(to_tensor) != 1 or len(normalize) != 1 or normalize[0] != to_tensor[0] + 1:
        raise UnsupportedPreprocessError(
            f"the model's preprocess {names} needs exactly one ToTensor immediately followed by one "
            "Normalize to add pixel noise between them"
        )
    cut = to_tensor[0] + 1
    return Compose(transforms[:cut]), Compose(transforms[cut:])


@dataclass(frozen=True)
class NoisyImage:
    """An image with the noise the preprocessing must add to it: std and this image's own seed."""

    image: Image.Image
    std: float
    seed: int


class CorruptedPreprocess:
    """The model's preprocessing with the published Gaussian noise between ToTensor and Normalize, for
    :class:`NoisyImage` inputs; a plain image gets the plain preprocessing."""

    def __init__(self, preprocess: Callable) -> None:
        self.preprocess = preprocess
        self.before, self.after = split_preprocess(preprocess)

    def __call__(self, item: NoisyImage | Image.Image) -> Tensor:
        if not isinstance(item, NoisyImage):
            return self.preprocess(item)
        pixels = add_gaussian_noise(self.before(item.image), item.std, noise_generator(item.seed))
        return self.after(pixels)

    def __repr__(self) -> str:
        # Feature caches key on repr(vlm.preprocess); the noise itself is keyed by the view's fingerprint.
        return f"CorruptedPreprocess({self.preprocess!r})"


def corrupted_preprocess(preprocess: Callable) -> CorruptedPreprocess:
    """Wrap a model's preprocessing so that :class:`CorruptedView` items get their pixel noise."""
    return CorruptedPreprocess(preprocess)


class CorruptedView(ZeroShotDataset):
    """``base`` with Gaussian pixel noise of standard deviation ``std``, seeded by (seed, index).

    Items are ``(NoisyImage, label)``, not PIL images: the noise is added inside the preprocessing
    (:func:`corrupted_preprocess`), after resizing and before normalisation. Same name, split, classes
    and templates as ``base``; the fingerprint adds std and seed.
    """

    def __init__(self, base: ZeroShotDataset, std: float, seed: int = 0) -> None:
        if not std >= 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        self.base, self.std, self.seed = base, float(std), int(seed)
        self.name, self.split = base.name, base.split
        self.classnames, self.templates = base.classnames, base.templates

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[NoisyImage, int]:  # type: ignore[override]
        image, label = self.base[index]
        return NoisyImage(image, self.std, image_seed(self.seed, index)), label

    def fingerprint(self) -> str:
        return fingerprint_of("gaussian-noise", self.base.fingerprint(), self.std, self.seed)


# ------------------------------------------------------------------------ true-class similarity


def _full_variance(name: str, var: Tensor | tuple[Tensor, Tensor], rows: int, dim: int) -> Tensor:
    """[rows, dim] diagonal variances from a full tensor or a KFAC rank-one pair (scale [rows], dir [dim])."""
    if isinstance(var, tuple):
        scale, direction = var
        check_tensor(f"{name} scale", scale, 1)
        check_tensor(f"{name} dir", direction, 1)
        var = scale[:, None] * direction[None, :]
    check_tensor(name, var, 2)
    if tuple(var.shape) != (rows, dim):
        raise ValueError(f"{name} must have shape {(rows, dim)}, got {tuple(var.shape)}")
    if (var < 0).any():
        raise ValueError(f"{name} contains negative variances")
    return var


def true_class_similarity(
    img_mean: Tensor,
    img_var: Tensor | tuple[Tensor, Tensor],
    txt_mean: Tensor,
    txt_var: Tensor | tuple[Tensor, Tensor],
    labels: Tensor,
) -> tuple[Tensor, Tensor]:
    """ProbCosine mean and variance [N] of each image with its own class (method.md §5), float64:

    E = mu_g . mu_h / sqrt(S_g S_h),  Var = sum_d [(mu_g,d^2 + v_g,d) v_h,d + v_g,d mu_h,d^2] / (S_g S_h),
    S = sum_d (mu_d^2 + v_d), with h the class embedding of the image's label. Variances are [N, D] / [K, D]
    or KFAC rank-one pairs (``variance_factors``: scale [N], dir [D]). Costs O(N D), no [N, K] matrix.
    """
    check_tensor("img_mean", img_mean, 2)
    check_tensor("txt_mean", txt_mean, 2)
    n, d = img_mean.shape
    if txt_mean.shape[1] != d:
        raise ValueError(f"txt_mean has embedding dim {txt_mean.shape[1]}, img_mean has {d}")
    if labels.shape != (n,) or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"labels must be an integer tensor of shape ({n},), got {labels.dtype} {tuple(labels.shape)}"
        )
    if n and not (0 <= int(labels.min()) and int(labels.max()) < txt_mean.shape[0]):
        raise ValueError(f"labels must lie in [0, {txt_mean.shape[0]}): one per class embedding")
    vg = _full_variance("img_var", img_var, n, d).double()
    vh_all = _full_variance("txt_var", txt_var, txt_mean.shape[0], d).double()
    idx = labels.to(txt_mean.device)
    mg, mh, vh = img_mean.double(), txt_mean.double()[idx], vh_all[idx]
    sq_g, sq_h = mg.square() + vg, mh.square() + vh
    denom = sq_g.sum(1) * sq_h.sum(1)
    mean = (mg * mh).sum(1) / denom.sqrt()
    var = (sq_g * vh + vg * mh.square()).sum(1) / denom
    return mean, var


def similarity_stats(
    std: float,
    img_mean: Tensor,
    img_var: Tensor | tuple[Tensor, Tensor],
    txt_mean: Tensor,
    txt_var: Tensor | tuple[Tensor, Tensor],
    labels: Tensor,
) -> dict[str, float]:
    """One noise level's summary over images of the true-class similarity.

    mean_similarity / mean_similarity_sd: mean and standard deviation over images of E[cos];
    similarity_variance / similarity_variance_sd: the same of Var[cos]; map_similarity: mean of the
    deterministic cosine of the mean embeddings (the MAP model's view).
    """
    mean, var = true_class_similarity(img_mean, img_var, txt_mean, txt_var, labels)
    zero = torch.zeros_like(img_mean)
    map_cos, _ = true_class_similarity(img_mean, zero, txt_mean, torch.zeros_like(txt_mean), labels)
    return {
        "std": float(std),
        "n": int(mean.numel()),
        "mean_similarity": float(mean.mean()),
        "mean_similarity_sd": float(mean.std()) if mean.numel() > 1 else 0.0,
        "similarity_variance": float(var.mean()),
        "similarity_variance_sd": float(var.std()) if var.numel() > 1 else 0.0,
        "map_similarity": float(map_cos.mean()),
    }


# ------------------------------------------------------------------------------------------ figures


def plot_similarity_vs_noise(stats: Sequence[dict[str, float]], path: Path, title: str = "") -> Path:
    """Two panels over the noise std: the true-class E[cos] (mean over images, +-1 sd band; the MAP
    cosine dashed) and Var[cos] (mean, +-1 sd band). ``stats``: :func:`similarity_stats` per level."""
    rows = sorted(stats, key=lambda s: s["std"])
    x = np.array([s["std"] for s in rows])
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.2))
    for ax, key, label in (
        (left, "mean_similarity", "E[cos] with true class"),
        (right, "similarity_variance", "Var[cos] with true class"),
    ):
        y = np.array([s[key] for s in rows])
        sd = np.array([s[f"{key}_sd"] for s in rows])
        ax.plot(x, y, "o-", color="tab:blue", label="BayesVLM")
        ax.fill_between(x, y - sd, y + sd, color="tab:blue", alpha=0.2, linewidth=0)
        ax.set(xlabel="pixel noise std", ylabel=label)
    left.plot(x, [s["map_similarity"] for s in rows], "s--", color="tab:gray", label="MAP cosine")
    left.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_metrics_vs_noise(
    rows: Sequence[dict[str, float | str]],
    path: Path,
    metrics: Sequence[str] = ("acc", "nll", "ece"),
    title: str = "",
) -> Path:
    """One panel per metric over the noise std, one line per method. ``rows``: dicts with ``std``,
    ``method`` and the metric columns of :func:`uqvlm.metrics.evaluate_log_probs`."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.0), squeeze=False)
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for method in methods:
            pts = sorted((float(r["std"]), float(r[metric])) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
        ax.set(xlabel="pixel noise std", ylabel=metric)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
