"""Real-data code paths on local data: a saved Hugging Face dataset for zero-shot, local webdataset
shards for the Hessian, through the same configs and tasks the hub uses; offline real runs fail fast."""

from __future__ import annotations

import io
import tarfile

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from uqvlm.cli import run_task

NAMES = ["apple", "banana", "cherry"]


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    split = {"image": [_image(i) for i in range(12)], "label": [i % 3 for i in range(12)]}
    datasets.DatasetDict(
        {s: datasets.Dataset.from_dict(split, features=features) for s in ("test", "validation")}
    ).save_to_disk(str(root / "hf"))
    (root / "wds").mkdir()
    for shard in range(2):
        with tarfile.open(root / "wds" / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * 20, shard * 20 + 20):
                buf = io.BytesIO()
                _image(100 + i).save(buf, "JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"a photo of a {NAMES[i % 3]}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def test_zeroshot_on_saved_hf_dataset_with_hessian_from_local_shards(
    local_data, tiny_checkpoint, tmp_path, compose
):
    overrides = [
        "dataset=food101",
        "model=uqvlm-tiny",
        f"dataset.source={local_data / 'hf'}",
        "dataset.label_key=label",
        "dataset.classnames={from: features}",
        "dataset.name=local-fruit",
        "+dataset.val_split=validation",
        "hessian_data=laion400m",
        f"hessian_data.root={local_data / 'wds'}",
        "hessian_data.n=40",
        "hessian_data.class_batch=20",
        f"model.pretrained={tiny_checkpoint}",
        "task.methods.tta.views=2",
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.results_dir={tmp_path}/results",
    ]
    run_task(compose(*overrides))
    table = pd.read_csv(tmp_path / "results" / "zeroshot" / "local-fruit" / "uqvlm-tiny.csv")
    assert set(table.method) >= {"map", "temperature", "tta", "bayesvlm-kfac", "bayesvlm-diag"}
    assert (table.n == 12).all()
    # The posteriors were estimated from the 40 local webdataset pairs.
    assert len(list((tmp_path / "cache" / "posteriors").glob("*.pt"))) == 2


def test_real_model_and_dataset_fail_fast_offline(tmp_path, cli_error, monkeypatch, compose, connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    cfg = compose(
        "model=clip-b32",
        "dataset=imagenet-r",
        f"paths.cache_dir={tmp_path}/c",
        f"paths.results_dir={tmp_path}/r",
    )
    out = cli_error(cfg)
    assert "clip-benchmark/wds_imagenet-r" in out and "HF_HOME" in out
    assert connections == []  # offline: no network, and nothing computed before the message
    assert not (tmp_path / "c" / "features").exists()
