"""Overhead study: counted FLOPs against hand counts enumerated from the code and the architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from uqvlm.studies.overhead import (
    NK_PASSES,
    count_elementwise,
    count_flops,
    encoder_flops,
    overhead_summary,
    per_image_overhead,
    predictive_costs,
    time_call,
)


@pytest.mark.parametrize("bias", [False, True])
def test_predictive_matmul_flops_equal_the_hand_count(bias):
    n, k, d, p, q = 5, 7, 6, 4, 3
    costs = predictive_costs(
        n, k, d, p, q, image_bias=bias, text_bias=bias, logit_bias=-1.0 if bias else None
    )
    pa, qa = p + bias, q + bias  # the bias is one more input column of A
    # MAP: one [N, D] x [D, K] product (the normalisation is elementwise).
    assert costs["map"].matmul_flops == 2 * n * d * k
    # BayesVLM: the mean cosine, the activations projected on A's eigenbasis [N, p'] x [p', p'] (+ a
    # one-row probe that returns diag B~^-1), the same for the K prompts; the rank-2 variance is elementwise.
    hand = 2 * n * d * k + 2 * (n + 1) * pa * pa + 2 * (k + 1) * qa * qa
    assert costs["bayesvlm"].matmul_flops == hand


@pytest.mark.parametrize("bias", [False, True])
def test_per_image_overhead_equals_the_hand_count_per_image(bias):
    k, d, p, q, encoder = 7, 6, 4, 3, 10_000
    small, large = (
        predictive_costs(n, k, d, p, q, image_bias=bias, text_bias=bias, logit_bias=-1.0 if bias else None)
        for n in (5, 8)
    )
    pa = p + bias
    # Per extra image BayesVLM adds a^T A~^-1 a through A's eigenbasis (2 * p'^2) in matmuls (its row of
    # the rank-2 variance is elementwise); the prompts' variances are paid once. MAP's per image: its
    # encoder and one row of the cosine logits (2 * D * K).
    assert per_image_overhead(encoder, small, large) == pytest.approx(
        (2 * pa * pa) / (encoder + 2 * d * k), rel=1e-12
    )
    with pytest.raises(ValueError, match="more images"):
        per_image_overhead(encoder, large, small)
    with pytest.raises(ValueError, match="same K"):
        per_image_overhead(encoder, small, predictive_costs(8, k + 1, d, p, q))


def test_nk_passes_formula_matches_the_measured_bilinear_term():
    # The cost is a N K + b N + c K + e for fixed D, p, q: the mixed second difference isolates a.
    def ops(n, k, method):
        return predictive_costs(n, k, 6, 4, 3)[method].elementwise_ops

    for method in ("map", "bayesvlm"):
        mixed = ops(9, 12, method) - ops(5, 12, method) - ops(9, 7, method) + ops(5, 7, method)
        assert mixed == NK_PASSES[method] * (9 - 5) * (12 - 7)
        assert predictive_costs(5, 7, 6, 4, 3)[method].elementwise_ops_nk == NK_PASSES[method] * 35


def test_count_elementwise_counts_elements_of_the_largest_operand():
    a, b = torch.randn(4, 5), torch.randn(5)
    assert count_elementwise(lambda: a * b + 1.0) == 2 * 20  # broadcast mul, add
    assert count_elementwise(lambda: a.sum(1)) == 20
    assert count_elementwise(lambda: a.T.contiguous()) == 20  # the view is free, the copy is not
    assert count_elementwise(lambda: a @ a.T) == 0  # a matmul: FlopCounterMode's
    assert count_flops(lambda: a @ a.T) == 2 * 4 * 5 * 4


def _tiny_hand_count() -> dict[str, int]:
    cfg = json.loads(
        (Path(__file__).parents[1] / "uqvlm" / "models" / "model_configs" / "uqvlm-tiny.json").read_text()
    )
    v, t, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]

    def transformer(tokens: int, width: int, layers: int, mlp_ratio: float = 4.0) -> int:
        hidden = int(width * mlp_ratio)
        per_layer = (
            2 * tokens * width * 3 * width  # q, k, v
            + 2 * 2 * tokens * tokens * width  # q k^T and attn v, all heads together
            + 2 * tokens * width * width  # out projection
            + 2 * 2 * tokens * width * hidden  # MLP up and down
        )
        return layers * per_layer

    patches = (v["image_size"] // v["patch_size"]) ** 2
    image = (
        2 * patches * (3 * v["patch_size"] ** 2) * v["width"]  # patch embedding conv
        + transformer(patches + 1, v["width"], v["layers"])
        + 2 * v["width"] * embed  # visual.proj on the class token
    )
    text = transformer(t["context_length"], t["width"], t["layers"]) + 2 * t["width"] * embed
    return {"image": image, "text": text}


def test_encoder_flops_equal_the_architecture_hand_count():
    from uqvlm.models import load_vlm

    vlm = load_vlm("uqvlm-tiny")  # random init: FLOPs depend on shapes only
    assert encoder_flops(vlm) == _tiny_hand_count()
    # Attention included although the fast path is the default outside the count.
    assert torch.backends.mha.get_fastpath_enabled()


class _LatentPool(torch.nn.Module):
    """An image tower that feeds a learned parameter to a submodule, as SigLIP's attention pool feeds its
    latent query to ``q`` (timm ``AttentionPoolLatent``)."""

    image_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.latent = torch.nn.Parameter(torch.randn(1, 3))
        self.q = torch.nn.Linear(3, 5)
        self.patch = torch.nn.Linear(48, 5)

    def forward(self, x):
        return self.patch(x.flatten(1)) + self.q(self.latent.expand(len(x), -1))


def test_encoder_flops_count_a_tower_that_feeds_a_parameter_to_a_submodule():
    # FlopCounterMode's module tracker hooks the gradient of every module input that requires one; a
    # parameter under no_grad has neither a grad_fn nor a way to get one (SigLIP-B/16 failed so).
    from types import SimpleNamespace

    class Model(torch.nn.Module):
        context_length = 2

        def __init__(self) -> None:
            super().__init__()
            self.visual, self.text = _LatentPool(), torch.nn.Embedding(10, 6)

        def encode_image(self, pixels):
            return self.visual(pixels)

        def encode_text(self, tokens):
            return self.text(tokens).sum(1) @ torch.ones(6, 5)

    model = Model()
    counts = encoder_flops(SimpleNamespace(model=model), batch=3)
    assert counts == {"image": 2 * 3 * 48 * 5 + 2 * 3 * 3 * 5, "text": 2 * 3 * 6 * 5}
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_overhead_summary_refuses_mismatched_sizes():
    a = predictive_costs(3, 4, 6, 4, 3)
    b = predictive_costs(3, 5, 6, 4, 3)
    with pytest.raises(ValueError, match="different N x K"):
        overhead_summary({"image": 10, "text": 10}, {"map": a["map"], "bayesvlm": b["bayesvlm"]})
    s = overhead_summary({"image": 1000, "text": 500}, a)
    assert s["flops_overhead"] > 0 and s["flops_overhead_with_elementwise"] > s["flops_overhead"]


def test_time_call_runs_warmup_plus_repeats():
    calls = []
    t = time_call(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and t >= 0.0
    with pytest.raises(ValueError):
        time_call(lambda: None, repeats=0)
