"""The uqvlm-tiny open_clip model: registration, reproducible checkpoints, and (slow) its accuracy."""

from __future__ import annotations

import open_clip
import pytest
import torch

from uqvlm.data.shapes import SHIFTED_DOMAINS
from uqvlm.models.tiny import MODEL_NAME, evaluate_domains, pretrain_tiny, register_model_configs


def test_register_is_idempotent() -> None:
    register_model_configs()
    register_model_configs()
    assert MODEL_NAME in open_clip.list_models()


def test_short_pretraining_is_reproducible_and_loadable(tmp_path, one_thread) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for path in (a, b):
        metrics = pretrain_tiny(path, seed=1, steps=3, batch_size=16, n_pairs=64, progress=False)
        assert metrics["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]  # no temp files left
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    register_model_configs()
    model = open_clip.create_model(MODEL_NAME, pretrained=str(a))
    assert torch.equal(model.visual.proj.detach(), sa["visual.proj"])


@pytest.mark.slow
def test_pretrained_tiny_is_good_and_shifts_hurt(tiny_checkpoint) -> None:
    """The cached shapes-pretrained checkpoint (the one every offline run uses) is genuinely good."""
    register_model_configs()
    model = open_clip.create_model(MODEL_NAME, pretrained=str(tiny_checkpoint))
    results = evaluate_domains(model, open_clip.get_tokenizer(MODEL_NAME), n=1_000)
    clean = results["photo"]["accuracy"]
    assert clean >= 0.80
    for domain in SHIFTED_DOMAINS:
        assert 0.25 < results[domain]["accuracy"] < clean, (domain, results[domain])
