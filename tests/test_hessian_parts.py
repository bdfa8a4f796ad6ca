"""Hessians map-reduced over class batches (task=hessian hessian_data.num_parts=K hessian_data.part=i):
the merged posteriors equal those of the whole data, a killed part resumes, foreign parts are refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from uqvlm.data.base import PairRange
from uqvlm.data.registry import build_pair_dataset
from uqvlm.errors import ConfigError, UqvlmError
from uqvlm.features import Features
from uqvlm.laplace import Laplace, likelihood_for
from uqvlm.tasks import hessian
from uqvlm.tasks.common import extract_features, load_model, prepare_dirs

# 6 class batches of 20 pairs: 3 parts of 2 batches.
N_PAIRS, CLASS_BATCH, PARTS = 120, 20, 3


@pytest.fixture
def settings_for(tmp_path, tiny_checkpoint, settings_of):
    def make(*overrides: str, cache: str = "cache"):
        return settings_of(
            f"paths.cache_dir={tmp_path / cache}",
            f"paths.results_dir={tmp_path / 'results'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"model.pretrained={tiny_checkpoint}",
            f"hessian_data.n={N_PAIRS}",
            f"hessian_data.class_batch={CLASS_BATCH}",
            f"hessian_data.num_parts={PARTS}",
            *overrides,
        )

    return make


def _whole_data_posteriors(settings, model, dirs, structure: str):
    """The truth: the library API updated with every class batch in order, on the features of the same
    pairs (the parts' cached features, concatenated) on the model's device (where the parts computed
    theirs), then finalized."""
    pairs = build_pair_dataset(settings.hessian_data.section)
    per_part = N_PAIRS // PARTS
    feats = [
        extract_features(model, dirs, PairRange(pairs, i * per_part, (i + 1) * per_part), "truth")
        for i in range(PARTS)
    ]
    image = Features.cat([f["image"] for f in feats]).to(model.device)
    text = Features.cat([f["text"] for f in feats]).to(model.device)
    likelihood = likelihood_for(model.vlm)
    posts = {
        "image": Laplace(model.vlm.image_head, structure, likelihood=likelihood),
        "text": Laplace(model.vlm.text_head, structure, likelihood=likelihood),
    }
    for start in range(0, N_PAIRS, CLASS_BATCH):
        rows = slice(start, start + CLASS_BATCH)
        posts["image"].update(image.activations[rows], image.embeddings[rows], text.embeddings[rows])
        posts["text"].update(text.activations[rows], text.embeddings[rows], image.embeddings[rows])
    return {tower: post.finalize().to("cpu") for tower, post in posts.items()}


def _assert_same_posteriors(merged, truth, structure: str) -> None:
    for tower in ("image", "text"):
        got, want = merged[tower], truth[tower]
        assert got.num_data == want.num_data == N_PAIRS
        if structure == "kfac":
            torch.testing.assert_close(got.A, want.A, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(got.B, want.B, rtol=1e-12, atol=1e-14)
        else:
            torch.testing.assert_close(got.ggn_diagonal, want.ggn_diagonal, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("structure", ["kfac", "diag"])
def test_parts_merged_equal_the_whole_data_posterior_and_are_found_by_a_single_job(
    settings_for, structure, monkeypatch
):
    settings = settings_for()
    dirs = prepare_dirs(settings.paths)
    model = load_model(settings, dirs)
    data = settings.hessian_data
    outcomes = [hessian.fit_part(data, model, dirs, structure, part) for part in (2, 0, 1)]
    assert [posts is None for posts, _ in outcomes] == [True, True, False]  # the last part merges
    merged, ident = outcomes[-1]
    _assert_same_posteriors(merged, _whole_data_posteriors(settings, model, dirs, structure), structure)
    # The merge wrote the entry a single job reads (the same key): nothing is estimated again.
    monkeypatch.setattr(hessian._Estimate, "run_part", lambda *a: pytest.fail("estimated again"))
    single = settings_for("hessian_data.num_parts=1")
    posts, single_ident = hessian.fit_posteriors(single.hessian_data, model, dirs, structure)
    assert single_ident == ident
    name = "B" if structure == "kfac" else "ggn"
    for tower in ("image", "text"):
        assert torch.equal(posts[tower].state_dict()[name], merged[tower].state_dict()[name])


def test_a_part_killed_midway_resumes_from_its_finished_batches(settings_for, monkeypatch):
    settings = settings_for()
    dirs = prepare_dirs(settings.paths)
    model = load_model(settings, dirs)
    data = settings.hessian_data
    batch_sums = hessian._Estimate._batch_sums
    computed = []

    def killed_after_one(self, feats, batch, rows):
        if computed:
            raise KeyboardInterrupt("killed")
        computed.append(batch)
        return batch_sums(self, feats, batch, rows)

    monkeypatch.setattr(hessian._Estimate, "_batch_sums", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        hessian.fit_part(data, model, dirs, "kfac", 1)
    assert computed == [2]  # part 1 holds batches 2 and 3; batch 2's sums were written

    def counted(self, feats, batch, rows):
        computed.append(batch)
        return batch_sums(self, feats, batch, rows)

    monkeypatch.setattr(hessian._Estimate, "_batch_sums", counted)
    computed.clear()
    assert hessian.fit_part(data, model, dirs, "kfac", 1)[0] is None
    assert computed == [3]  # only the batch the kill lost
    hessian.fit_part(data, model, dirs, "kfac", 0)
    merged, _ = hessian.fit_part(data, model, dirs, "kfac", 2)
    assert computed == [3, 0, 1, 4, 5]
    _assert_same_posteriors(merged, _whole_data_posteriors(settings, model, dirs, "kfac"), "kfac")


def test_merge_refuses_missing_parts_and_parts_of_another_config(settings_for, compose, tmp_path, cli_error):
    ours = settings_for()
    dirs = prepare_dirs(ours.paths)
    model = load_model(ours, dirs)
    for part in (0, 1):
        hessian.fit_part(ours.hessian_data, model, dirs, "kfac", part)
    # task=hessian_merge with a part missing: one line naming it.
    cfg = compose(
        "task=hessian_merge",
        "posterior=kfac",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.results_dir={tmp_path / 'results'}",
        f"model.pretrained={model.vlm.pretrained}",
        f"hessian_data.n={N_PAIRS}",
        f"hessian_data.class_batch={CLASS_BATCH}",
        f"hessian_data.num_parts={PARTS}",
    )
    out = cli_error(cfg)
    assert "2 of 6 class batches have no partial sums yet" in out and "for parts [2]" in out
    # Another config (other pairs: another seed of the shapes world) computes the missing batches ...
    theirs = settings_for("hessian_data.seed=1")
    hessian.fit_part(theirs.hessian_data, model, dirs, "kfac", 2)
    estimate = hessian._Estimate(ours.hessian_data, model, dirs, "kfac")
    foreign = hessian._Estimate(theirs.hessian_data, model, dirs, "kfac")
    for batch in (4, 5):  # ... and its partial sums are copied in as if they were ours
        shutil.copy(foreign.batch_path(batch), estimate.batch_path(batch))
    with pytest.raises(UqvlmError, match=r"computed for another config \(data: ") as err:
        hessian.merge_posteriors(ours.hessian_data, model, dirs, "kfac")
    assert "\n" not in str(err.value) and str(estimate.parts_dir) in str(err.value)
    assert not estimate.path.exists()


def test_part_settings_are_checked(settings_for):
    with pytest.raises(
        ConfigError, match=r"hessian_data.part must be null \(every part\) or an integer in \[0, 3\)"
    ):
        settings_for("hessian_data.part=3")
    with pytest.raises(ConfigError, match="hessian_data.num_parts must be a positive integer"):
        settings_for("hessian_data.num_parts=0")


@pytest.mark.parametrize(("n_batches", "num_parts"), [(6, 3), (6, 12), (10, 16), (7, 2), (1, 1)])
def test_parts_cover_every_class_batch_once_in_order(n_batches, num_parts):
    parts = [list(hessian.part_batches(n_batches, p, num_parts)) for p in range(num_parts)]
    assert [b for part in parts for b in part] == list(range(n_batches))
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


def test_pair_features_reuse_the_parts_features(settings_for, monkeypatch):
    """ProbVLM's pair features come from the entries the parts cached: equal to one extraction of all pairs,
    and nothing is encoded again."""
    from uqvlm import extraction

    settings = settings_for()
    dirs = prepare_dirs(settings.paths)
    model = load_model(settings, dirs)
    for part in range(PARTS):
        hessian.fit_part(settings.hessian_data, model, dirs, "kfac", part)
    pairs = build_pair_dataset(settings.hessian_data.section)
    with monkeypatch.context() as patch:
        patch.setattr(extraction, "_encode_batches", lambda *a, **k: pytest.fail("encoded again"))
        feats = hessian.pair_features(pairs, settings.hessian_data, model, dirs)
    whole = extract_features(model, dirs, pairs, "truth")  # one extraction of every pair, encoded now
    for tower in ("image", "text"):
        torch.testing.assert_close(feats[tower].embeddings, whole[tower].embeddings, rtol=1e-5, atol=1e-6)
        assert len(feats[tower].embeddings) == N_PAIRS
