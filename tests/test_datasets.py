"""Real-world dataset sources behind the one interface, on small local fixtures (no network)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from uqvlm.data.registry import PAIR_KINDS, ZEROSHOT_KINDS, build_pair_dataset, build_zeroshot_dataset
from uqvlm.data.sources import (
    HFPairs,
    HFZeroShot,
    ImageFolderZeroShot,
    WebDatasetPairs,
    expand_braces,
)
from uqvlm.data.templates import PAPER, TEMPLATE_SETS, check_templates, get_templates
from uqvlm.errors import DatasetFormatError, DataUnavailableError

REPO = Path(__file__).resolve().parents[1]
NAMES = ["red_panda", "golden retriever", "tabby_cat"]


@pytest.fixture(autouse=True)
def _isolated_hf(monkeypatch, tmp_path):
    """Offline, and every cache in tmp: tests never read or write the user's Hugging Face caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def _image(seed: int, size: int = 12, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    return img.convert(mode)


def _bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


GOOD_JPEG = _bytes(_image(99, 32), "JPEG")
TRUNCATED_JPEG = GOOD_JPEG[: len(GOOD_JPEG) // 3]


def _hf_dataset(n: int, seed: int, bad: dict[int, bytes] | None = None) -> datasets.Dataset:
    bad = bad or {}
    images = [
        {"bytes": bad.get(i) or _bytes(_image(seed + i, mode="L" if i % 2 else "RGB")), "path": None}
        for i in range(n)
    ]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(n)]}, features=features
    )


@pytest.fixture()
def hf_dir(tmp_path) -> Path:
    path = tmp_path / "hfds"
    datasets.DatasetDict({"test": _hf_dataset(9, 0), "train": _hf_dataset(6, 100)}).save_to_disk(str(path))
    return path


# ----------------------------------------------------------------------------- Hugging Face, labelled


def test_hf_saved_dataset_items(hf_dir):
    ds = HFZeroShot(str(hf_dir), "test", classnames={"from": "features"}, templates="paper", name="toy")
    assert len(ds) == 9 and ds.split == "test" and ds.name == "toy"
    assert ds.classnames == ["red panda", "golden retriever", "tabby cat"]
    assert ds.templates == PAPER
    assert ds.prompts()[0] == ["An image of a red panda"]  # BayesVLM's prompt: no trailing period
    for i in range(len(ds)):
        img, label = ds[i]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (12, 12)
        assert label == i % 3
    assert ds.skipped == 0


def test_hf_fingerprints(hf_dir, tmp_path):
    fp = HFZeroShot(str(hf_dir), "test").fingerprint()
    assert fp == HFZeroShot(str(hf_dir), "test").fingerprint(), "stable across instances"
    assert fp != HFZeroShot(str(hf_dir), "train").fingerprint(), "split matters"
    assert fp != HFZeroShot(str(hf_dir), "test", n=4).fingerprint(), "subsampling matters"
    other = tmp_path / "other"
    datasets.DatasetDict({"test": _hf_dataset(9, 50)}).save_to_disk(str(other))
    assert fp != HFZeroShot(str(other), "test").fingerprint(), "source matters"
    assert fp == HFZeroShot(str(hf_dir), "test", templates="cifar10").fingerprint(), "templates do not"


def test_hf_subsample_is_seeded(hf_dir):
    a, b = HFZeroShot(str(hf_dir), n=4, seed=1), HFZeroShot(str(hf_dir), n=4, seed=1)
    assert len(a) == 4 and [a[i][1] for i in range(4)] == [b[i][1] for i in range(4)]
    assert list(a._indices) != list(HFZeroShot(str(hf_dir), n=4, seed=2)._indices)


def test_hf_unknown_split_and_missing_path(hf_dir, tmp_path):
    with pytest.raises(DataUnavailableError, match="validation"):
        HFZeroShot(str(hf_dir), "validation")
    with pytest.raises(DataUnavailableError, match="does not exist"):
        HFZeroShot(None, root=str(tmp_path / "nope"))


def test_hf_label_classname_mismatch(hf_dir):
    with pytest.raises(DatasetFormatError, match="outside the 2 class names"):
        HFZeroShot(str(hf_dir), classnames=["a", "b"])


def test_hf_bad_images_error_and_skip(tmp_path):
    path = tmp_path / "bad"
    datasets.DatasetDict(
        {"test": _hf_dataset(6, 0, bad={1: b"not an image", 4: TRUNCATED_JPEG})}
    ).save_to_disk(str(path))
    strict = HFZeroShot(str(path), on_bad_image="error")
    assert len(strict) == 6
    strict[0]
    with pytest.raises(DatasetFormatError, match="on_bad_image=skip"):
        strict[1]
    with pytest.raises(DatasetFormatError):
        strict[4]
    lenient = HFZeroShot(str(path), on_bad_image="skip")
    assert len(lenient) == 4 and lenient.skipped == 2 and lenient.skipped_indices == [1, 4]
    assert [lenient[i][1] for i in range(4)] == [0, 2, 0, 2]
    assert lenient.fingerprint() != strict.fingerprint()
    with pytest.raises(ValueError, match="on_bad_image"):
        HFZeroShot(str(path), on_bad_image="ignore")


def test_hf_empty_dataset(tmp_path):
    path = tmp_path / "empty"
    _hf_dataset(3, 0).select([]).save_to_disk(str(path), num_shards=1)
    with pytest.raises(DataUnavailableError, match="empty"):
        HFZeroShot(str(path))


def _wds_repo(root: Path, n: int = 6) -> Path:
    """A local copy of a clip-benchmark style webdataset repo: test/0.tar + classnames + templates."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(n):
            for ext, data in (("webp", _bytes(_image(i), "WEBP")), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def test_hf_webdataset_repo_with_files(tmp_path):
    repo = _wds_repo(tmp_path / "wds_toy")
    ds = HFZeroShot(
        "clip-benchmark/wds_toy",
        "test",
        root=str(repo),
        label_key="cls",
        classnames={"from": "file"},
        templates={"from": "file"},
    )
    assert len(ds) == 6 and ds.image_key == "webp"
    assert ds.classnames == NAMES
    assert ds.templates == ["a photo of a {c}.", "a drawing of a {c}."]
    img, label = ds[4]
    assert img.mode == "RGB" and label == 1


def test_offline_hub_id_fails_fast(connections):
    with pytest.raises(DataUnavailableError) as err:
        HFZeroShot("clip-benchmark/wds_no-such-dataset", "test")
    assert connections == []  # offline: not even a probe
    msg = str(err.value)
    assert (
        "clip-benchmark/wds_no-such-dataset" in msg
        and "dataset.root=" in msg
        and "--repo-type dataset" in msg
    )


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch, connections):
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(DataUnavailableError, match="wds_cifar10"):
        HFZeroShot("clip-benchmark/wds_cifar10", "test")
    assert len(connections) <= 1  # at most one reachability probe, then offline: no retry loops


def test_hub_cache_snapshot_is_used_offline(tmp_path):
    commit = "a" * 40
    base = tmp_path / "hf" / "hub" / "datasets--clip-benchmark--wds_toy"
    _wds_repo(base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    ds = HFZeroShot("clip-benchmark/wds_toy", "test", classnames={"from": "file"})
    assert len(ds) == 6 and ds.classnames == NAMES


# ----------------------------------------------------------------------------- image folders


def _folder(root: Path, counts: dict[str, int], bad: set[str] = frozenset()) -> Path:
    for c, k in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(k):
            name = f"{c}_{i}.jpg"
            data = b"\x00garbage" if f"{c}/{name}" in bad else _bytes(_image(hash((c, i)) % 1000), "JPEG")
            (root / c / name).write_bytes(data)
    (root / "notes.txt").write_text("ignored")
    return root


def test_imagefolder(tmp_path):
    root = _folder(tmp_path / "ucf", {"Apply_Eye_Makeup": 2, "Biking": 3})
    ds = ImageFolderZeroShot(str(root), templates="ucf101")
    assert ds.classnames == ["Apply Eye Makeup", "Biking"] and len(ds) == 5
    assert len(ds.templates) == 48 and ds.prompts()[1][0] == "a photo of a person Biking."
    assert [ds[i][1] for i in range(5)] == [0, 0, 1, 1, 1] and ds[0][0].mode == "RGB"
    named = ImageFolderZeroShot(str(root), classnames=["applying eye makeup", "biking"])
    assert named.classnames[0] == "applying eye makeup"
    mapped = ImageFolderZeroShot(str(root), classnames={"Biking": "riding a bike"})
    assert mapped.classnames == ["Apply Eye Makeup", "riding a bike"]
    with pytest.raises(DatasetFormatError, match="2 class folders but 3"):
        ImageFolderZeroShot(str(root), classnames=["a", "b", "c"])
    assert ds.fingerprint() != ImageFolderZeroShot(str(root), n=3).fingerprint()
    (root / "Biking" / "extra.png").write_bytes(_bytes(_image(5)))
    assert ds.fingerprint() != ImageFolderZeroShot(str(root)).fingerprint(), "content matters"


def test_imagefolder_split_subfolder(tmp_path):
    _folder(tmp_path / "data" / "test", {"a": 1, "b": 1})
    _folder(tmp_path / "data" / "train", {"a": 2, "b": 2})
    assert len(ImageFolderZeroShot(str(tmp_path / "data"), "test")) == 2
    assert len(ImageFolderZeroShot(str(tmp_path / "data"), "train")) == 4


def test_imagefolder_empty_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataUnavailableError, match="no class sub-folders"):
        ImageFolderZeroShot(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    with pytest.raises(DataUnavailableError, match="no images"):
        ImageFolderZeroShot(str(tmp_path / "noimg"))
    with pytest.raises(DataUnavailableError, match="does not exist"):
        ImageFolderZeroShot(str(tmp_path / "missing"))


def test_imagefolder_bad_images(tmp_path):
    root = _folder(tmp_path / "f", {"a": 2, "b": 2}, bad={"b/b_0.jpg"})
    strict = ImageFolderZeroShot(str(root))
    with pytest.raises(DatasetFormatError, match="b_0.jpg"):
        strict[2]
    lenient = ImageFolderZeroShot(str(root), on_bad_image="skip")
    assert len(lenient) == 3 and lenient.skipped == 1 and [lenient[i][1] for i in range(3)] == [0, 0, 1]


# ----------------------------------------------------------------------------- pairs


def _shard(
    path: Path, start: int, count: int, *, corrupt: set[int] = frozenset(), no_caption: set[int] = frozenset()
):
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            key = f"{i:09d}"
            fields = {
                "jpg": b"\xff\xd8broken" if i in corrupt else _bytes(_image(i, 16), "JPEG"),
                "json": b"{}",
            }
            if i not in no_caption:
                fields["txt"] = f"caption number {i}\n".encode()
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_pairs(tmp_path):
    _shard(tmp_path / "shard-00.tar", 0, 5, no_caption={3})
    _shard(tmp_path / "shard-01.tar", 5, 5)
    ds = WebDatasetPairs("shard-{00..01}.tar", root=str(tmp_path), name="toy")
    assert len(ds) == 9 and ds.incomplete == 1
    img, cap = ds[0]
    assert img.mode == "RGB" and img.size == (16, 16) and cap == "caption number 0"
    assert ds[3][1] == "caption number 4" and ds[-1][1] == "caption number 9"
    with pytest.raises(IndexError):
        ds[9]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers receive a pickled copy
    assert clone[8][1] == "caption number 9"
    assert ds.fingerprint() == WebDatasetPairs(str(tmp_path / "shard-*.tar")).fingerprint()
    first = WebDatasetPairs(str(tmp_path / "shard-*.tar"), n=3)
    assert len(first) == 3 and first.shards == [str(tmp_path / "shard-00.tar")]
    assert first.fingerprint() != ds.fingerprint()


def test_webdataset_bad_images_and_errors(tmp_path):
    _shard(tmp_path / "a.tar", 0, 4, corrupt={1})
    strict = WebDatasetPairs(str(tmp_path / "a.tar"))
    with pytest.raises(DatasetFormatError, match="item 1"):
        strict[1]
    lenient = WebDatasetPairs(str(tmp_path / "a.tar"), on_bad_image="skip")
    assert lenient[1][1] == "caption number 2" and lenient.skipped == 1
    with pytest.raises(DataUnavailableError, match="no webdataset shards"):
        WebDatasetPairs("nothing-*.tar", root=str(tmp_path))
    with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "a.tar", arcname="x.txt")
    with pytest.raises(DatasetFormatError, match="uncompressed"):
        WebDatasetPairs(str(tmp_path / "z.tar.gz"))
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(DataUnavailableError, match="no jpg"):
        WebDatasetPairs(str(empty))


def test_expand_braces():
    assert expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_hf_pairs(tmp_path):
    n = 6
    images = [{"bytes": _bytes(_image(i)), "path": None} for i in range(n)]
    captions = [[f"img {i} cap {j}" for j in range(3)] for i in range(n)]
    split = ["train", "train", "val", "train", "test", "train"]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.List(datasets.Value("string")),
            "split": datasets.Value("string"),
        }
    )
    path = tmp_path / "flickr"
    datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict(
                {"image": images, "caption": captions, "split": split}, features=features
            )
        }
    ).save_to_disk(str(path))
    every = HFPairs(str(path), "test", caption_index="all", where={"split": "train"})
    assert len(every) == 12
    img, cap = every[4]
    assert img.mode == "RGB" and cap == "img 1 cap 1"
    one = HFPairs(str(path), "test", where={"split": ["train", "val"]})
    assert len(one) == 5 and one[2][1] == "img 2 cap 0"
    assert one.fingerprint() != every.fingerprint()
    assert len(HFPairs(str(path), "test", n=2, seed=0)) == 2
    with pytest.raises(DatasetFormatError, match="caption column"):
        HFPairs(str(path), "test", caption_key="text")


# ----------------------------------------------------------------------------- templates and registry


def test_templates():
    # bayesvlm/data/factory.py @ 855be8b: text_prompt = "An image of a {class_name}" (facts A2)
    assert get_templates("paper") == ["An image of a {c}"] and get_templates("default") == PAPER
    assert len(get_templates("openai_imagenet")) == 80 and len(get_templates("ucf101")) == 48
    assert len(get_templates("cifar10")) == 18
    for name, templates in TEMPLATE_SETS.items():
        assert check_templates(templates), name
    with pytest.raises(KeyError, match="openai_imagenet"):
        get_templates("imagenett")
    with pytest.raises(ValueError):
        check_templates(["a photo of a {}."])


def config_file(path) -> DictConfig:
    """A config file's section as Hydra composes it: its ``defaults`` list is Hydra's, not a key."""
    cfg = OmegaConf.load(path)
    cfg.pop("defaults", None)
    return cfg


def test_registry_builds_from_configs(hf_dir, tmp_path):
    assert {"hf", "imagefolder"} <= set(ZEROSHOT_KINDS) and {"wds", "hf"} <= set(PAIR_KINDS)
    cfg = OmegaConf.create(
        {
            "name": "toy",
            "kind": "hf",
            "source": str(hf_dir),
            "split": "test",
            "image_key": None,
            "label_key": None,
            "classnames": {"from": "features"},
            "templates": "paper",
            "root": None,
            "on_bad_image": "error",
            "n": 5,
            "seed": 0,
            "val_split": "train",
        }
    )
    ds = build_zeroshot_dataset(cfg)
    assert isinstance(ds, HFZeroShot) and len(ds) == 5 and ds.name == "toy"
    _folder(tmp_path / "f", {"x": 1, "y": 1})
    folder_cfg = OmegaConf.create(
        {"name": "folder", "kind": "imagefolder", "root": "???", "templates": "paper"}
    )
    with pytest.raises(DataUnavailableError, match="root"):
        build_zeroshot_dataset(folder_cfg)
    folder_cfg.root = str(tmp_path / "f")
    assert build_zeroshot_dataset(folder_cfg).classnames == ["x", "y"]
    _shard(tmp_path / "s.tar", 0, 3)
    wds_cfg = OmegaConf.load(REPO / "configs" / "hessian_data" / "laion400m.yaml")
    with pytest.raises(DataUnavailableError, match="root"):
        build_pair_dataset(wds_cfg)
    wds_cfg.root = str(tmp_path)
    pairs = build_pair_dataset(wds_cfg)
    assert len(pairs) == 3 and pairs.name == "laion400m"
    with pytest.raises(ValueError, match="known kinds"):
        build_zeroshot_dataset({"kind": "nope"})


@pytest.mark.skipif("shapes" not in ZEROSHOT_KINDS, reason="uqvlm.data.shapes is not present")
def test_registry_shapes():
    cfg = OmegaConf.load(REPO / "configs" / "dataset" / "shapes-photo.yaml")
    cfg.n = 8
    ds = build_zeroshot_dataset(cfg)
    assert len(ds) == 8 and ds.templates
    cfg.templates = "paper"
    assert build_zeroshot_dataset(cfg).templates == PAPER


def _hub_configs() -> list[tuple[Path, str | None]]:
    """(config, protocol) of every shipped dataset option whose chosen protocol reads the hub."""
    from uqvlm.data.sections import apply_protocol

    out = []
    for path in sorted((REPO / "configs" / "dataset").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        for protocol in cfg.get("protocols") or [None]:
            chosen = apply_protocol({**cfg, "protocol": protocol}) if protocol else cfg
            if chosen.get("kind") == "hf":
                out.append((path, protocol))
    return [*out, (REPO / "configs" / "hessian_data" / "flickr30k.yaml", None)]


@pytest.mark.parametrize(("path", "protocol"), _hub_configs(), ids=lambda p: getattr(p, "stem", p))
def test_hub_configs_fail_fast_offline(path, protocol, connections):
    from uqvlm.data.sections import apply_protocol

    cfg = config_file(path)
    if protocol is not None:
        cfg.protocol = protocol
    build = build_pair_dataset if path.parent.name == "hessian_data" else build_zeroshot_dataset
    source = apply_protocol(OmegaConf.to_container(cfg))["source"]
    with pytest.raises(DataUnavailableError, match=source):
        build(cfg)
    assert connections == []
