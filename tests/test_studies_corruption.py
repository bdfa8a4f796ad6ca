"""Corruption study: the noise against its definition, its place in the preprocessing, true-class ProbCosine."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor

from uqvlm.data.shapes import ShapesZeroShot
from uqvlm.probcosine import probcosine
from uqvlm.studies.corruption import (
    CorruptedView,
    NoisyImage,
    UnsupportedPreprocessError,
    add_gaussian_noise,
    corrupted_preprocess,
    noise_generator,
    plot_metrics_vs_noise,
    plot_similarity_vs_noise,
    similarity_stats,
    split_preprocess,
    true_class_similarity,
)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _preprocess(size: int = 32) -> Compose:
    return Compose([Resize(size), CenterCrop(size), ToTensor(), Normalize(MEAN, STD)])


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_noise_is_additive_gaussian_where_not_clamped():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 200, 200, generator=g) * 0.6 + 0.2  # >= 2 sd from the clamps at std 0.1
    noisy = add_gaussian_noise(clean, 0.1, torch.Generator().manual_seed(1))
    inside = (noisy > 0) & (noisy < 1)
    diff = (noisy - clean)[inside].double()
    n = diff.numel()
    assert n > 0.99 * clean.numel()
    assert abs(float(diff.mean())) < 4 * 0.1 / math.sqrt(n)
    assert abs(float(diff.std()) - 0.1) < 4 * 0.1 / math.sqrt(2 * n)  # sd of a sample sd: sigma / sqrt(2n)


def test_noise_clamps_exactly_at_0_and_1_with_normal_tail_mass():
    clean = torch.full((3, 100, 100), 0.3)
    noisy = add_gaussian_noise(clean, 0.5, torch.Generator().manual_seed(2))
    assert float(noisy.min()) == 0.0 and float(noisy.max()) == 1.0
    n = noisy.numel()
    for frac, p in (
        (float((noisy == 0).double().mean()), _phi(-0.3 / 0.5)),
        (float((noisy == 1).double().mean()), 1 - _phi(0.7 / 0.5)),
    ):
        assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_zero_std_returns_the_identical_tensor():
    clean = torch.rand(3, 8, 8)
    assert torch.equal(add_gaussian_noise(clean, 0.0, torch.Generator().manual_seed(0)), clean)
    with pytest.raises(ValueError, match="std"):
        add_gaussian_noise(clean, -0.1)


def test_noise_goes_between_to_tensor_and_normalize():
    pre = _preprocess()
    image = Image.new("RGB", (40, 48), (120, 30, 200))
    out = corrupted_preprocess(pre)(NoisyImage(image, 0.3, 123))
    # By hand: resize + crop + ToTensor, then the published noise, then (x - mean) / std.
    pixels = ToTensor()(CenterCrop(32)(Resize(32)(image)))
    noisy = (pixels + 0.3 * torch.randn(pixels.shape, generator=noise_generator(123))).clamp(0, 1)
    expected = (noisy - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(out, expected)
    assert torch.equal(corrupted_preprocess(pre)(image), pre(image))  # plain images: plain preprocessing


def test_split_preprocess_errors_on_other_layouts():
    before, after = split_preprocess(_preprocess())
    assert [type(t) for t in before.transforms][-1] is ToTensor
    assert [type(t) for t in after.transforms] == [Normalize]
    for bad in (
        Compose([Resize(8), ToTensor()]),
        Compose([ToTensor(), Resize(8), Normalize(MEAN, STD)]),
        lambda x: x,
    ):
        with pytest.raises(UnsupportedPreprocessError, match="ToTensor"):
            split_preprocess(bad)


def test_open_clip_preprocess_has_the_expected_layout():
    from uqvlm.models import load_vlm

    before, after = split_preprocess(load_vlm("uqvlm-tiny").preprocess)
    assert isinstance(after.transforms[0], Normalize)


def test_corrupted_view_is_seeded_per_image_and_keyed():
    base = ShapesZeroShot(n=6, image_size=32)
    pre = corrupted_preprocess(_preprocess())
    view = CorruptedView(base, std=0.2, seed=5)
    a = torch.stack([pre(view[i][0]) for i in range(len(view))])
    b = torch.stack([pre(view[i][0]) for i in reversed(range(len(view)))]).flip(0)
    assert torch.equal(a, b)  # same noise whatever the order
    assert not torch.equal(a[0], pre(CorruptedView(base, 0.2, seed=6)[0][0]))
    assert [view[i][1] for i in range(6)] == [base[i][1] for i in range(6)]
    clean = torch.stack([_preprocess()(base[i][0]) for i in range(6)])
    assert torch.equal(torch.stack([pre(CorruptedView(base, 0.0)[i][0]) for i in range(6)]), clean)
    prints = {CorruptedView(base, s, seed).fingerprint() for s in (0.0, 0.2) for seed in (0, 1)}
    assert len(prints | {base.fingerprint()}) == 5
    with pytest.raises(TypeError):  # the plain preprocessing refuses a NoisyImage: no silent clean features
        _preprocess()(view[0][0])


def test_corrupted_view_extracts_through_the_feature_cache(tmp_path):
    from uqvlm.extraction import extract
    from uqvlm.models import load_vlm

    vlm = load_vlm("uqvlm-tiny")
    base = ShapesZeroShot(n=4, image_size=32)
    clean = extract(vlm, base, cache_dir=tmp_path, model_id={"m": "tiny"}, dataset_id=base.fingerprint())
    vlm.preprocess = corrupted_preprocess(vlm.preprocess)
    feats = {}
    for std in (0.0, 0.5):
        view = CorruptedView(base, std)
        feats[std] = extract(
            vlm, view, cache_dir=tmp_path, model_id={"m": "tiny"}, dataset_id=view.fingerprint()
        )
    torch.testing.assert_close(feats[0.0]["image"].embeddings, clean["image"].embeddings)
    assert not torch.allclose(feats[0.5]["image"].embeddings, clean["image"].embeddings)
    assert torch.equal(feats[0.5]["targets"], clean["targets"])


def _posterior_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, k, d = 7, 4, 5
    return (
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.rand(n, generator=g, dtype=torch.float64),
        torch.rand(d, generator=g, dtype=torch.float64),
        torch.randn(k, d, generator=g, dtype=torch.float64),
        torch.rand(k, generator=g, dtype=torch.float64),
        torch.rand(d, generator=g, dtype=torch.float64),
        torch.randint(0, k, (n,), generator=g),
    )


def test_true_class_similarity_is_the_probcosine_entry_of_the_label():
    mg, c, b, mh, e, f, y = _posterior_case()
    vg, vh = c[:, None] * b, e[:, None] * f
    full_mean, full_var = probcosine(mg, vg, mh, vh)
    rows = torch.arange(len(y))
    for img_var, txt_var in (((c, b), (e, f)), (vg, vh)):
        mean, var = true_class_similarity(mg, img_var, mh, txt_var, y)
        torch.testing.assert_close(mean, full_mean[rows, y])
        torch.testing.assert_close(var, full_var[rows, y])


def test_similarity_stats_summarise_over_images():
    mg, c, b, mh, e, f, y = _posterior_case(1)
    full_mean, full_var = probcosine(mg, c[:, None] * b, mh, e[:, None] * f)
    rows = torch.arange(len(y))
    stats = similarity_stats(0.1, mg, (c, b), mh, (e, f), y)
    assert stats["mean_similarity"] == pytest.approx(float(full_mean[rows, y].mean()))
    assert stats["mean_similarity_sd"] == pytest.approx(float(full_mean[rows, y].std()))
    assert stats["similarity_variance"] == pytest.approx(float(full_var[rows, y].mean()))
    plain = torch.nn.functional.cosine_similarity(mg, mh[y], dim=1)
    assert stats["map_similarity"] == pytest.approx(float(plain.mean()))
    with pytest.raises(ValueError, match="labels"):
        similarity_stats(0.1, mg, (c, b), mh, (e, f), y + 10)


def test_figures_are_written(tmp_path):
    mg, c, b, mh, e, f, y = _posterior_case(2)
    stats = [
        similarity_stats(s, mg + s * torch.randn_like(mg), (c * (1 + s), b), mh, (e, f), y)
        for s in (0, 0.1, 0.3)
    ]
    rows = [
        {"std": s, "method": m, "acc": 0.9 - s, "nll": 0.3 + s, "ece": 0.05 + s / 4}
        for s in (0, 0.1, 0.3)
        for m in ("map", "bayesvlm")
    ]
    for path in (
        plot_similarity_vs_noise(stats, tmp_path / "sim.png"),
        plot_metrics_vs_noise(rows, tmp_path / "metrics.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
