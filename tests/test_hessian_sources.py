"""Hessian data that exists today, on replicas in a local Hugging Face cache (HF_HUB_OFFLINE): CC12M as
webdataset shards of a hub repo (pixparse/cc12m-wds), Flickr30k as the hub's parquet conversion of
nlphuji/flickr30k, each through the same config and task a real run uses; `uqvlm fetch` finds them."""

from __future__ import annotations

import io
import tarfile

import datasets
import numpy as np
import pytest
from PIL import Image

from uqvlm import cli
from uqvlm.cli import run_task
from uqvlm.data.registry import build_pair_dataset
from uqvlm.errors import DataUnavailableError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHARD_SIZE = 12  # samples per replica shard


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()


def _snapshot(hf_home, repo: str, ref: str = "main"):
    """A repo's snapshot folder in the hub cache layout (datasets--org--name/{refs,snapshots})."""
    root = hf_home / "hub" / f"datasets--{repo.replace('/', '--')}"
    (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def cc12m_caption(i: int) -> str:
    return f"caption of sample {i}"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def cc12m(hf_home):
    """Two shards cc12m-train-0000.tar / 0001.tar of <key>.jpg + <key>.txt + <key>.json samples, as
    pixparse/cc12m-wds names them; the second shard's first sample lacks its caption."""
    snap = _snapshot(hf_home, "pixparse/cc12m-wds")
    for shard in range(2):
        with tarfile.open(snap / f"cc12m-train-{shard:04d}.tar", "w") as tar:
            for i in range(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE):
                members = {"jpg": _jpeg(i), "txt": cc12m_caption(i).encode(), "json": b"{}"}
                if i == SHARD_SIZE:
                    del members["txt"]
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return snap


def fitted_posteriors(compose, tiny_checkpoint, tmp_path, *overrides) -> int:
    """Run task=hessian (KFAC, class batches of 10) on the tiny model; the posteriors it cached."""
    run_task(
        compose(
            "task=hessian",
            *overrides,
            "hessian_data.class_batch=10",
            "posterior=kfac",
            f"model.pretrained={tiny_checkpoint}",
            f"paths.cache_dir={tmp_path}/cache",
            f"paths.results_dir={tmp_path}/results",
        )
    )
    return len(list((tmp_path / "cache" / "posteriors").glob("kfac-*.pt")))


def _cc12m_section(compose, *overrides):
    return compose("hessian_data=cc12m", *overrides).hessian_data


def test_cc12m_pairs_come_from_the_cached_shards_in_order(cc12m, compose):
    pairs = build_pair_dataset(
        _cc12m_section(compose, "hessian_data.n=20", "hessian_data.pairs_per_shard=12")
    )
    assert len(pairs) == 20
    # Shard 0 gives samples 0..11, shard 1 those after its caption-less first sample.
    expected = [cc12m_caption(i) for i in [*range(SHARD_SIZE), *range(SHARD_SIZE + 1, 2 * SHARD_SIZE)]][:20]
    assert [pairs[i][1] for i in range(20)] == expected
    # An estimate of more pairs per shard than there are: the next shard is taken all the same.
    more = build_pair_dataset(
        _cc12m_section(compose, "hessian_data.n=20", "hessian_data.pairs_per_shard=500")
    )
    assert [more[i][1] for i in range(20)] == expected


def test_cc12m_beyond_the_cached_shards_fails_fast_offline(cc12m, compose):
    with pytest.raises(
        DataUnavailableError, match=r"needs 40 pairs .* 23 pairs in 2 shard\(s\) .*`uqvlm fetch"
    ):
        build_pair_dataset(_cc12m_section(compose, "hessian_data.n=40", "hessian_data.pairs_per_shard=12"))


def test_hessian_task_on_cc12m_and_fetch_finds_its_shards(cc12m, tiny_checkpoint, tmp_path, compose, capsys):
    common = ["task=hessian", "hessian_data=cc12m", "hessian_data.n=20", "hessian_data.pairs_per_shard=12"]
    assert fitted_posteriors(compose, tiny_checkpoint, tmp_path, *common) == 1
    capsys.readouterr()
    cli.main(["fetch", *common, f"model.pretrained={tiny_checkpoint}"])  # everything cached: exit status 0
    out = " ".join(capsys.readouterr().out.split())
    assert "present hessian_data cc12m (pixparse/cc12m-wds: 2 of 2176 shards" in out and "ready" in out
    with pytest.raises(SystemExit) as exit_info:  # 40 pairs need a third shard: not in the cache
        cli.main(["fetch", *common[:2], "hessian_data.n=40", "hessian_data.pairs_per_shard=12"])
    assert exit_info.value.code == 1
    assert "missing hessian_data cc12m (pixparse/cc12m-wds: 4 of 2176" in " ".join(
        capsys.readouterr().out.split()
    )


@pytest.fixture
def flickr(hf_home):
    """The parquet conversion's layout: branch refs/convert/parquet, TEST/test/0000.parquet, one split
    holding every image with its Karpathy split in a column and five captions."""
    snap = _snapshot(hf_home, "nlphuji/flickr30k", "refs/convert/parquet")
    karpathy = ["train", "val", "train", "test", "train", "train"]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Sequence(datasets.Value("string")),
            "split": datasets.Value("string"),
            "filename": datasets.Value("string"),
        }
    )
    rows = {
        "image": [{"bytes": _jpeg(100 + i), "path": None} for i in range(len(karpathy))],
        "caption": [[f"image {i} caption {j}" for j in range(5)] for i in range(len(karpathy))],
        "split": karpathy,
        "filename": [f"{i}.jpg" for i in range(len(karpathy))],
    }
    (snap / "TEST" / "test").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(snap / "TEST" / "test" / "0000.parquet")
    )
    return [i for i, s in enumerate(karpathy) if s == "train"]


def test_flickr30k_parquet_conversion_gives_the_karpathy_train_pairs(
    flickr, tiny_checkpoint, tmp_path, compose, capsys
):
    pairs = build_pair_dataset(compose("hessian_data=flickr30k").hessian_data)
    assert sorted(pairs[i][1] for i in range(len(pairs))) == sorted(
        f"image {i} caption {j}" for i in flickr for j in range(5)
    )
    assert fitted_posteriors(compose, tiny_checkpoint, tmp_path, "hessian_data=flickr30k") == 1
    capsys.readouterr()
    cli.main(["fetch", "task=hessian", "hessian_data=flickr30k", f"model.pretrained={tiny_checkpoint}"])
    out = " ".join(capsys.readouterr().out.split())
    assert "present hessian_data flickr30k (nlphuji/flickr30k) nlphuji/flickr30k@refs/convert/parquet" in out
