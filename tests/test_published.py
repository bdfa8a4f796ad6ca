"""The published BayesVLM factors serve as the KFAC posterior of the matching open_clip architecture."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from uqvlm.cli import run_task
from uqvlm.laplace import likelihood_for
from uqvlm.laplace.reference import load_published_factors
from uqvlm.tasks.common import load_model, load_settings, prepare_dirs
from uqvlm.tasks.hessian import fit_posteriors


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for cls in ("red_square", "blue_circle"):
        (root / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")
    return root


def compose_published(compose, reference_hessians, image_folder, tmp_path):
    overrides = [
        "model=clip-b32",
        "model.pretrained=null",
        "model.batch_size=8",
        "hessian_data=published",
        f"hessian_data.dir={reference_hessians}",
        "posterior=kfac",
        "posterior.evidence_variant=reference",
        "posterior.n=1",
        "dataset=ucf101",
        f"dataset.root={image_folder}",
        "~task.methods.temperature",
        "~task.methods.tta",
        "task.plots=false",
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.results_dir={tmp_path}/results",
    ]
    return compose(*overrides)


def test_factors_become_the_posterior_of_vit_b_32(reference_hessians, image_folder, tmp_path, compose):
    settings = load_settings(compose_published(compose, reference_hessians, image_folder, tmp_path))
    dirs = prepare_dirs(settings.paths)
    model = load_model(settings, dirs)
    posts, ident = fit_posteriors(settings.hessian_data, model, dirs, "kfac")
    published = load_published_factors(reference_hessians)
    a = published["A_img"]
    torch.testing.assert_close(posts["image"].A, (a + a.T) / 2, rtol=1e-12, atol=1e-9)
    assert posts["image"].last_layer.weight.shape == (512, 768)
    assert posts["text"].last_layer.weight.shape == (512, 512)
    assert ident == {"published": str(reference_hessians)}
    # EPIG's updates add curvature to them under the model's likelihood.
    assert posts["image"].likelihood == posts["text"].likelihood == likelihood_for(model.vlm)


def test_zeroshot_run_with_published_factors(reference_hessians, image_folder, tmp_path, compose):
    cfg = compose_published(compose, reference_hessians, image_folder, tmp_path)
    run_task(cfg)
    table = pd.read_csv(tmp_path / "results" / "zeroshot" / "ucf101" / "ViT-B-32.csv")
    assert list(table.method) == ["map", "bayesvlm-kfac", "bayesvlm-kfac-mc"]
    assert (table.n == 6).all()
    assert table.nll.notna().all()
