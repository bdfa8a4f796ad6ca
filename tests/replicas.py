"""Replicas of the real data sources: their exact layouts, filled with a few tiny generated images.

Each builder writes the layout of one real source (cited in its docstring, from docs/real-sources.md), so the
configs users run find the replicas where they would find the real data:

- :func:`write_hub_repo`: a Hugging Face hub cache entry as huggingface_hub writes it (``blobs/<etag>``,
  ``snapshots/<commit>/<path>`` relative symlinks, ``refs/main``), served offline from ``HF_HOME/hub``.
- :func:`wds_repo_files`: CLIP_benchmark's webdataset repo (``test/{0..n-1}.tar`` of ``s%07d.<img>`` +
  ``s%07d.cls``, ``test/nshards.txt``, ``classnames.txt`` and ``zeroshot_classification_templates.txt``).
- :func:`write_zhou`: CoOp's split file and its image folder (UCF101, SUN397, EuroSAT path conventions).
- :func:`write_imagenet_r_folder`, :func:`write_officehome`, :func:`write_imagenet_variations`: the folder
  trees BayesVLM reads.

Every image is an 8x8 solid colour that encodes its item number (:func:`image_number`), so a test can tell
which source item a dataset returned. The session fixtures at the end build the small replicas the end-to-end
tests share (a few classes each: the text tower costs about 0.05 s per prompt on CPU).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

IMAGE_SIZE = 8
FORMATS = {"webp": ("WEBP", {"lossless": True}), "jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {})}
# CLIP_benchmark's templates file of e.g. wds_sun397 (facts B: 38 B, "a photo of a {c}." / "a photo of the {c}.").
CB_TEMPLATES = ["a photo of a {c}.", "a photo of the {c}."]


# ------------------------------------------------------------------------------------------------ images


def solid_image(number: int) -> Image.Image:
    """An 8x8 image whose red and green channels encode ``number`` (0..1023) in steps of 8."""
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (8 * (number % 32), 8 * (number // 32), 77))


def image_bytes(number: int, ext: str = "jpg") -> bytes:
    fmt, kw = FORMATS[ext.lower().lstrip(".").replace("jpeg", "jpg")]
    buf = io.BytesIO()
    solid_image(number).save(buf, format=fmt, **kw)
    return buf.getvalue()


def image_number(img: Image.Image) -> int:
    """The number :func:`solid_image` drew (robust to JPEG's rounding)."""
    r, g, _ = img.convert("RGB").getpixel((IMAGE_SIZE // 2, IMAGE_SIZE // 2))
    return round(r / 8) + 32 * round(g / 8)


# ---------------------------------------------------------------------------------- Hugging Face hub cache


def _etag(path: str, data: bytes) -> str:
    """What huggingface_hub names a blob: the sha256 of an LFS file (tars, images), the git blob sha1 of a
    plain text file."""
    if path.endswith((".tar", ".parquet", ".bin", ".pt")):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hub_repo(
    hub_cache: Path,
    repo_id: str,
    files: dict[str, bytes],
    *,
    repo_type: str = "dataset",
    commit: str | None = None,
) -> Path:
    """``files`` (repo path -> bytes) as a snapshot of ``repo_id`` in the hub cache ``hub_cache``
    (``HF_HOME/hub``), laid out as huggingface_hub's ``hf_hub_download`` leaves it: the bytes in
    ``blobs/<etag>``, ``snapshots/<commit>/<path>`` a relative symlink to the blob, ``refs/main`` the commit.
    Returns the snapshot folder."""
    kind = {"dataset": "datasets", "model": "models"}[repo_type]
    repo = hub_cache / f"{kind}--{repo_id.replace('/', '--')}"
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        blob = repo / "blobs" / _etag(rel, data)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# ---------------------------------------------------------------------------- CLIP_benchmark webdatasets


def _tar(members: Sequence[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _lines(items: Sequence[str]) -> bytes:
    # CLIP_benchmark writes them with print(*items, sep="\n", end="\n").
    return ("\n".join(items) + "\n").encode()


def write_img2dataset_shards(root: Path, pairs: int, per_shard: int = 4) -> Path:
    """img2dataset's webdataset output (what ``hessian_data=laion400m`` reads): ``{00000..}.tar`` shards of
    ``<9-digit key>.jpg`` + ``.txt`` (+ ``.json``) members, uncompressed."""
    root.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, pairs, per_shard)):
        members = []
        for i in range(start, min(pairs, start + per_shard)):
            key = f"{i:09d}"
            members += [
                (f"{key}.jpg", image_bytes(i)),
                (f"{key}.txt", f"a photo of item {i}".encode()),
                (f"{key}.json", b"{}"),
            ]
        (root / f"{shard:05d}.tar").write_bytes(_tar(members))
    return root


def wds_repo_files(
    classnames: Sequence[str],
    labels: Sequence[int],
    *,
    ext: str = "webp",
    shards: int = 1,
    split: str = "test",
    templates: Sequence[str] = CB_TEMPLATES,
    first_number: int = 0,
) -> dict[str, bytes]:
    """The files of a CLIP_benchmark webdataset repo (clip_benchmark/webdataset_builder.py @ 48de38c; facts B):
    sample ``i`` (label ``labels[i]``, image number ``first_number + i``) is written under the key
    ``"s%07d" % i`` as ``<key>.<ext>`` and ``<key>.cls`` (the label in decimal), consecutive samples filling
    ``<split>/0.tar``, ``<split>/1.tar``, ... (``shards`` of them, as ShardWriter fills them); ``<split>/nshards.txt``
    holds the count; ``classnames.txt`` and ``zeroshot_classification_templates.txt`` sit at the repo root."""
    per_shard = -(-len(labels) // shards)
    files: dict[str, bytes] = {}
    for s in range(shards):
        members = []
        for i in range(s * per_shard, min(len(labels), (s + 1) * per_shard)):
            key = f"s{i:07d}"  # CLIP_benchmark: "s%07d" % index
            members += [
                (f"{key}.cls", str(int(labels[i])).encode()),
                (f"{key}.{ext}", image_bytes(first_number + i, ext)),
            ]
        files[f"{split}/{s}.tar"] = _tar(members)
    files[f"{split}/nshards.txt"] = f"{shards}\n".encode()
    files["classnames.txt"] = _lines(classnames)
    files["zeroshot_classification_templates.txt"] = _lines(templates)
    return files


# ------------------------------------------------------------------------------------- CoOp split files


def write_zhou(
    base: Path, images_dir: str, split_file: str, entries: dict[str, list[tuple[str, int, str]]]
) -> tuple[Path, Path]:
    """CoOp's layout (KaiyangZhou/CoOp @ ff61507, facts C): ``base/<split_file>`` = ``{"train"|"val"|"test":
    [[path relative to the image folder, label, classname], ...]}`` and each image at ``base/<images_dir>/<path>``.
    Image numbers follow the entries (train, val, test). Returns (split file, image folder)."""
    images = base / images_dir
    number = 0
    for split_entries in entries.values():
        for rel, _, _ in split_entries:
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            (images / rel).write_bytes(image_bytes(number, "jpg"))
            number += 1
    path = base / split_file
    path.write_text(json.dumps({k: [list(e) for e in v] for k, v in entries.items()}))
    return path, images


def ucf101_entry(action: str, label: int, group: int, clip: int) -> tuple[str, int, str]:
    """An entry as CoOp made split_zhou_UCF101.json (datasets/ucf101.py ``read_data``): the CamelCase action
    split into words joined by ``_`` names the folder and the class; the video's .avi became .jpg."""
    import re

    renamed = "_".join(re.findall("[A-Z][^A-Z]*", action))
    return f"{renamed}/v_{action}_g{group:02d}_c{clip:02d}.jpg", label, renamed


def sun397_entry(category: str, label: int, number: int) -> tuple[str, int, str]:
    """An entry as CoOp made split_zhou_SUN397.json: ``/a/apartment_building/outdoor`` -> path
    ``a/apartment_building/outdoor/sun_<id>.jpg`` and class ``outdoor apartment_building``."""
    names = category.split("/")[1:]
    return f"{category.lstrip('/')}/sun_{number:016x}.jpg", label, " ".join(names[1:][::-1])


# CoOp's EuroSAT NEW_CNAMES (datasets/eurosat.py @ ff61507, facts C), in folder order.
EUROSAT_CLASSES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


def eurosat_entry(folder: str, label: int, number: int) -> tuple[str, int, str]:
    return f"{folder}/{folder}_{number}.jpg", label, EUROSAT_CLASSES[folder]


# ---------------------------------------------------------------------------------------- folder trees


def write_imagenet_r_folder(
    root: Path, classes: Sequence[tuple[str, str]], files: dict[str, Sequence[str]], readme_header: str = ""
) -> Path:
    """ImageNet-R's tar as unpacked (facts A2): ``root/README.txt`` with one ``<wnid> <name>`` line per class
    (names underscored, e.g. ``n01443537 goldfish``) after free text, and ``root/<wnid>/<file>`` images. The
    README's free text is not known here: ``readme_header`` holds lines that start with no wnid. Image numbers
    follow ``files`` in the order given."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [*readme_header.splitlines(), *[f"{w} {n}" for w, n in classes]]
    (root / "README.txt").write_text("\n".join(lines) + "\n")
    number = 0
    for wnid, _ in classes:
        (root / wnid).mkdir(exist_ok=True)
        for name in files.get(wnid, ()):
            (root / wnid / name).write_bytes(image_bytes(number, Path(name).suffix or "jpg"))
            number += 1
    return root


def write_class_tree(root: Path, layout: dict[str, dict[str, Sequence[str]]]) -> dict[Path, int]:
    """``root/<domain>/<class>/<file>`` for every file of ``layout`` (domain -> class -> file names); image
    numbers run over the files in the order given. Returns each file's number."""
    numbers: dict[Path, int] = {}
    for domain, classes in layout.items():
        for cls, names in classes.items():
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                numbers[folder / name] = len(numbers)
                (folder / name).write_bytes(image_bytes(numbers[folder / name], Path(name).suffix))
    return numbers


OFFICEHOME_DOMAINS = ("Art", "Clipart", "Product", "Real World")


def write_officehome(root: Path, classes: Sequence[str], counts: dict[str, int]) -> dict[Path, int]:
    """OfficeHomeDataset_10072016 (facts A2): ``root/{Art,Clipart,Product,Real World}/<Class_Name>/<nnnnn>.jpg``;
    ``counts`` spreads each domain's images over the classes in turn. Returns each file's image number."""
    layout = {
        d: {c: [f"{i + 1:05d}.jpg" for i in range(k, counts[d], len(classes))] for k, c in enumerate(classes)}
        for d in OFFICEHOME_DOMAINS
    }
    return write_class_tree(root, layout)


def write_imagenet_variations(root: Path, layout: dict[str, dict[str, Sequence[str]]]) -> dict[Path, int]:
    """BayesVLM's ``imagenet_variations`` folder (facts A2): ``root/{imagenet-a,imagenet-r,imagenet-sketch}/
    <wnid>/*.jpg|*.JPEG`` (the published ``classes.csv`` is not written: its source is unverified). Returns
    each file's image number."""
    return write_class_tree(root, layout)


# ---------------------------------------------------------------------------------------------- fixtures


SMALL = ["alpha", "beta", "gamma"]  # short class lists where the class count is not what a test checks
FEW_LABELS = [2, 0, 1]  # the labels of the small single-split replicas' three images


@pytest.fixture(scope="session")
def replica_home(tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds small replicas of every CLIP_benchmark repo the dataset configs name."""
    home = tmp_path_factory.mktemp("replica-hf-home")
    hub = home / "hub"
    labels12 = [i % 3 for i in range(12)]
    few = FEW_LABELS
    repos = {
        "clip-benchmark/wds_vtab-cifar10": wds_repo_files(SMALL, few),
        "clip-benchmark/wds_vtab-cifar100": wds_repo_files(SMALL, few),
        "clip-benchmark/wds_food101": wds_repo_files(SMALL, few, shards=2),
        "clip-benchmark/wds_vtab-flowers": wds_repo_files(SMALL, few),
        "clip-benchmark/wds_vtab-dtd": wds_repo_files(SMALL, few),
        "clip-benchmark/wds_vtab-eurosat": wds_repo_files(SMALL, few),
        # 12 shards of one sample: shard 10 sorts before shard 2 by name, not by number.
        "clip-benchmark/wds_imagenet-r": wds_repo_files(SMALL, labels12, shards=12),
        "clip-benchmark/wds_imagenet_sketch": wds_repo_files(SMALL, labels12, ext="jpg", shards=2),
        "clip-benchmark/wds_sun397": wds_repo_files(SMALL, few, shards=2),
    }
    for repo_id, files in repos.items():
        # CLIP_benchmark repos also hold a train split (e.g. wds_vtab-cifar10, wds_food101): never read for test.
        train = {"train/0.tar": b"not a tar: reading it would fail", "train/nshards.txt": b"1\n"}
        write_hub_repo(hub, repo_id, {**files, **train})
    return home


@pytest.fixture()
def replica_env(replica_home: Path, monkeypatch) -> Path:
    """Offline, with HF_HOME at the replica hub cache (as a user with a filled cache runs)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(replica_home))
    for var in ("HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return replica_home


@pytest.fixture(scope="session")
def replica_folders(tmp_path_factory) -> dict[str, Path]:
    """Small replicas of the sources read from folders: CoOp split files and their images, the ImageNet-R
    tar, OfficeHome and BayesVLM's imagenet_variations tree."""
    base = tmp_path_factory.mktemp("replica-folders")
    actions = ["ApplyEyeMakeup", "Biking", "YoYo"]
    ucf = {
        split: [ucf101_entry(a, k, g, 1) for g in groups for k, a in enumerate(actions)]
        for split, groups in (("train", [8, 9]), ("val", [10]), ("test", [1]))
    }
    cats = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"]
    sun = {
        split: [
            sun397_entry(c, k, 100 * j + k)
            for j in range(start, start + 1 + (split == "train"))
            for k, c in enumerate(cats)
        ]
        for split, start in (("train", 0), ("val", 2), ("test", 4))
    }
    folders = list(EUROSAT_CLASSES)[:3]
    euro = {
        split: [
            eurosat_entry(f, k, 10 * j + k)
            for j in range(start, start + 1 + (split == "train"))
            for k, f in enumerate(folders)
        ]
        for split, start in (("train", 0), ("val", 2), ("test", 4))
    }
    out: dict = {}
    out["ucf101_split"], out["ucf101_root"] = write_zhou(
        base / "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", ucf
    )
    out["sun397_split"], out["sun397_root"] = write_zhou(
        base / "sun397", "SUN397", "split_zhou_SUN397.json", sun
    )
    out["eurosat_split"], out["eurosat_root"] = write_zhou(
        base / "eurosat", "2750", "split_zhou_EuroSAT.json", euro
    )
    out["imagenet_r"] = write_imagenet_r_folder(
        base / "imagenet-r",
        [("n01443537", "goldfish"), ("n01484850", "great_white_shark"), ("n03773504", "missile")],
        {
            "n01443537": ["art_0.jpg", "art_1.jpg", "cartoon_0.jpg", "sketch_0.png"],
            "n01484850": ["art_0.jpg", "misc_0.jpg", "toy_0.jpg", "toy_1.JPG"],
            "n03773504": ["art_0.jpg", "graffiti_0.jpg", "origami_0.jpg", "tattoo_0.jpg"],
        },
        readme_header="ImageNet-R: renditions of 200 ImageNet classes\nwnid and class name:",
    )
    out["officehome"] = base / "OfficeHomeDataset_10072016"
    out["officehome_numbers"] = write_officehome(out["officehome"], OFFICEHOME_CLASSES, OFFICEHOME_COUNTS)
    out["imagenet_variations"] = base / "imagenet_variations"
    out["imagenet_variations_numbers"] = write_imagenet_variations(
        out["imagenet_variations"], VARIATIONS_LAYOUT
    )
    return out


OFFICEHOME_CLASSES = ["Alarm_Clock", "Backpack", "Desk_Lamp"]
# Uneven domain sizes, so int() flooring shows: 13 -> 8/2/3, 10 -> 6/2/2, 11 -> 6/2/3, 12 -> 7/2/3.
OFFICEHOME_COUNTS = {"Art": 13, "Clipart": 10, "Product": 11, "Real World": 12}


# imagenet-r holds goldfish, great white shark and missile (n03773504); imagenet-a lacks the shark (as A holds
# 86 of R's 200 wnids) and has a class R lacks; imagenet-sketch has the other "missile", projectile n04008634.
VARIATIONS_LAYOUT: dict[str, dict[str, list[str]]] = {
    "imagenet-a": {
        "n01443537": [f"0.00{i}_goldfish_{i}.jpg" for i in range(5)],
        "n01498041": [f"0.01{i}_stingray_{i}.jpg" for i in range(5)],
        "n03773504": [f"0.02{i}_missile_{i}.jpg" for i in range(5)],
    },
    "imagenet-r": {
        "n01443537": [f"art_{i}.jpg" for i in range(5)],
        "n01484850": [f"art_{i}.jpg" for i in range(5)],
        "n03773504": [f"art_{i}.jpg" for i in range(5)],
    },
    "imagenet-sketch": {
        "n01443537": [f"sketch_{i}.JPEG" for i in range(5)],
        "n01484850": [f"sketch_{i}.JPEG" for i in range(5)],
        "n03773504": [f"sketch_{i}.JPEG" for i in range(5)],
        "n04008634": [f"sketch_{i}.JPEG" for i in range(5)],
    },
}
