"""The real sources, offline: the published protocols' splits, prompts and class identities, checked against
independent truths (NumPy's and Python's own seeded draws, the datasets library's split, the published code
re-run on replica trees), and every real dataset config run end to end on a replica of its source
(tests/replicas.py). Facts cited as "facts X" are from docs/real-sources.md."""

from __future__ import annotations

import collections
import json
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from replicas import (
    FEW_LABELS,
    OFFICEHOME_CLASSES,
    OFFICEHOME_COUNTS,
    OFFICEHOME_DOMAINS,
    SMALL,
    VARIATIONS_LAYOUT,
    image_number,
    wds_repo_files,
    write_hub_repo,
    write_imagenet_r_folder,
    write_img2dataset_shards,
    write_zhou,
)

from uqvlm.data.registry import build_zeroshot_dataset
from uqvlm.data.sources.imagenet import (
    IMAGENET_A_WNIDS,
    IMAGENET_R_WNIDS,
    IMAGENET_WNIDS,
    ImageNetRFolder,
    imagenet_r_mask,
)
from uqvlm.data.sources.splits import (
    hf_train_test_split,
    numpy_permutation_split,
    published_domain_split,
    published_pool_order,
)
from uqvlm.data.templates import get_templates, resolve_templates
from uqvlm.errors import ConfigError, DataUnavailableError, UqvlmError
from uqvlm.features import Features

REPO = Path(__file__).resolve().parents[1]


def _config(compose, *overrides: str):
    return compose(*overrides).dataset


# ------------------------------------------------------------------------------------ prompts and classes


def test_paper_prompt_is_bayesvlms_without_a_period_and_clip_benchmark_reads_the_repo_file(tmp_path):
    """facts A2: ``text_prompt = "An image of a {class_name}"``, no trailing period, one template."""
    assert get_templates("paper") == ["An image of a {c}"]
    assert resolve_templates("clip_benchmark") is None and resolve_templates({"from": "file"}) is None
    home = tmp_path / "hf"
    snapshot = write_hub_repo(
        home / "hub", "x/wds_toy", wds_repo_files(SMALL, [0, 1], templates=["a {c} here."])
    )
    from uqvlm.data.sources import HFZeroShot

    ds = HFZeroShot(
        str(snapshot), "test", label_key="cls", classnames={"from": "file"}, templates="clip_benchmark"
    )
    assert ds.prompts() == [[f"a {c} here."] for c in SMALL]


def test_wnid_lists_are_the_published_ones():
    """facts A3: 1000 unique ImageNet wnids in index order; ImageNet-R's 200 are a subset whose mask indices
    start [1, 2, 4, 6, 8, 9, 11, 13, 22, 23, ...] and end [..., 980, 981, 983, 988]; ImageNet-A and -R share 86."""
    assert len(IMAGENET_WNIDS) == len(set(IMAGENET_WNIDS)) == 1000 and IMAGENET_WNIDS == sorted(
        IMAGENET_WNIDS
    )
    assert IMAGENET_WNIDS[:2] == ["n01440764", "n01443537"] and IMAGENET_WNIDS[-1] == "n15075141"
    for subset in (IMAGENET_R_WNIDS, IMAGENET_A_WNIDS):
        assert len(subset) == len(set(subset)) == 200 and set(subset) <= set(IMAGENET_WNIDS)
    assert IMAGENET_R_WNIDS[:5] == ["n01443537", "n01484850", "n01494475", "n01498041", "n01514859"]
    assert IMAGENET_R_WNIDS[-4:] == ["n09472597", "n09835506", "n10565667", "n12267677"]
    mask = imagenet_r_mask().tolist()
    assert mask[:25] == [
        1,
        2,
        4,
        6,
        8,
        9,
        11,
        13,
        22,
        23,
        26,
        29,
        31,
        39,
        47,
        63,
        71,
        76,
        79,
        84,
        90,
        94,
        96,
        97,
        99,
    ]
    assert mask[-4:] == [980, 981, 983, 988] and [IMAGENET_WNIDS[i] for i in mask] == IMAGENET_R_WNIDS
    assert len(set(IMAGENET_A_WNIDS) & set(IMAGENET_R_WNIDS)) == 86


def test_openai_imagenet_names_repeat_so_names_cannot_align_imagenet_domains():
    """The duplicate names, derived from open_clip's list: "missile" is n03773504 and n04008634, of which
    ImageNet-R holds only the first."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    counts = collections.Counter(IMAGENET_CLASSNAMES)
    duplicates = {
        name: [IMAGENET_WNIDS[i] for i, n in enumerate(IMAGENET_CLASSNAMES) if n == name]
        for name, k in counts.items()
        if k > 1
    }
    assert duplicates["missile"] == ["n03773504", "n04008634"]
    assert "n03773504" in IMAGENET_R_WNIDS and "n04008634" not in IMAGENET_R_WNIDS


# ------------------------------------------------------------------------- split arithmetic at real sizes


def test_imagenet_r_split_is_numpys_seeded_permutation_at_30000():
    """facts A2: ``np.random.seed(0); perm = np.random.permutation(n)``, first int(0.75 n) train: 7,500 test."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        perm = np.random.permutation(30_000)
    finally:
        np.random.set_state(state)
    train, test = numpy_permutation_split(30_000, 0.75, 0)
    assert len(test) == 7_500 and len(train) == 22_500
    assert np.array_equal(train, perm[:22_500]) and np.array_equal(test, perm[22_500:])


def test_imagenet_sketch_cut_is_the_datasets_librarys_split_at_50889():
    """facts A2: HF ``train_test_split(test_size=0.025, seed=0)``: ceil(0.025 * 50,889) = 1,273 test images,
    the same rows the datasets library picks."""
    import datasets

    rows = datasets.Dataset.from_dict({"i": list(range(50_889))}).train_test_split(test_size=0.025, seed=0)
    train, test = hf_train_test_split(50_889, 0.025, 0)
    assert len(test) == 1_273 == math.ceil(0.025 * 50_889)
    assert test.tolist() == rows["test"]["i"] and train.tolist() == rows["train"]["i"]


def _published_domain_code(items: list) -> tuple[list, list, list]:
    """bayesvlm/data/homeoffice_da.py @ 855be8b as facts A2 quotes it (global stdlib RNG)."""
    data = list(items)
    random.seed(42)
    random.shuffle(data)
    data_trainval, data_test = data[: int(0.8 * len(data))], data[int(0.8 * len(data)) :]
    data_train, data_val = (
        data_trainval[: int(0.8 * len(data_trainval))],
        data_trainval[int(0.8 * len(data_trainval)) :],
    )
    return data_train, data_val, data_test


@pytest.mark.parametrize("count", [1, 2, 5, 10, 13, 99, 1000, 4321])
def test_published_domain_split_is_the_published_code(count):
    state = random.getstate()
    try:
        items = [{"img_path": f"x/{i:05d}.jpg", "class_id": i % 7} for i in range(count)]
        expected = _published_domain_code(items)
        ours = published_domain_split(count)
        assert [[items[i] for i in ours[s]] for s in ("train", "val", "test")] == list(expected)
        # The pool shuffle continues the RNG the last domain's seed(42) + shuffle left behind.
        pool = [{"i": i} for i in range(3 * count + 1)]
        random.shuffle(pool)
        assert [p["i"] for p in pool] == published_pool_order(count, 3 * count + 1)
    finally:
        random.setstate(state)
    if count == 1000:  # 80/20 then 80/20 with int() flooring: 64/16/20 %
        assert [len(ours[s]) for s in ("train", "val", "test")] == [640, 160, 200]


# ------------------------------------------------------------------------------------ the sources' readers


def test_wds_repo_reads_only_its_test_shards_in_key_order(tmp_path):
    """CLIP_benchmark's ``test/{0..n-1}.tar`` (nshards.txt) only, never train/, samples by key: 12 shards read
    in name order (0, 1, 10, 11, 2, ...) would scramble them."""
    from uqvlm.data.sources import HFZeroShot

    labels = [(7 * i) % 3 for i in range(12)]
    files = wds_repo_files(SMALL, labels, shards=12)
    snapshot = write_hub_repo(
        tmp_path / "hub", "x/wds_twelve", {**files, "train/0.tar": b"garbage", "train/nshards.txt": b"1\n"}
    )
    ds = HFZeroShot(str(snapshot), "test", label_key="cls", classnames={"from": "file"})
    assert [image_number(ds[i][0]) for i in range(12)] == list(range(12))
    assert ds.labels().tolist() == labels == [ds[i][1] for i in range(12)]
    os.unlink(snapshot / "test" / "7.tar")
    with pytest.raises(DataUnavailableError, match=r"1 of the 12 shards .* test/7.tar"):
        HFZeroShot(str(snapshot), "test", label_key="cls", classnames={"from": "file"})


def test_imagenet_r_folder_reads_as_bayesvlm(tmp_path):
    """facts A2: labels in README.txt line order (names underscored), .jpg files only (suffix case as
    written), items sorted by full path."""
    classes = [("n01484850", "great_white_shark"), ("n01443537", "goldfish")]  # README not in wnid order
    root = write_imagenet_r_folder(
        tmp_path / "imagenet-r",
        classes,
        {"n01484850": ["b.jpg", "a.jpg", "c.JPG"], "n01443537": ["z.jpg", "y.png", "x.jpg"]},
        readme_header="ImageNet-R\nnothing here starts with a wnid",
    )
    ds = ImageNetRFolder(root)
    assert ds.classnames == ["great_white_shark", "goldfish"] and ds.class_ids == ["n01484850", "n01443537"]
    assert ds._files == ["n01443537/x.jpg", "n01443537/z.jpg", "n01484850/a.jpg", "n01484850/b.jpg"]
    assert ds.labels().tolist() == [1, 1, 0, 0] and ds.prompts()[0] == ["An image of a great_white_shark"]
    # image numbers follow the files as written: shark b, a, c then goldfish z, y, x
    assert [image_number(ds[i][0]) for i in range(4)] == [5, 3, 1, 0]


def test_zhou_split_without_its_file_says_where_to_get_it_and_what_to_set(compose):
    for option, file_name, url_id in (
        ("ucf101", "split_zhou_UCF101.json", "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"),
        ("sun397", "split_zhou_SUN397.json", "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"),
        ("eurosat", "split_zhou_EuroSAT.json", "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"),
    ):
        with pytest.raises(DataUnavailableError) as err:
            build_zeroshot_dataset(_config(compose, f"dataset={option}"))
        message = str(err.value)
        assert "\n" not in message and file_name in message and url_id in message
        assert "dataset.split_file=" in message and "dataset.root=" in message


def test_protocol_keys_are_checked(compose, replica_folders):
    with pytest.raises(ConfigError, match=r"dataset.protocol must be one of bayesvlm for this dataset"):
        build_zeroshot_dataset(_config(compose, "dataset=ucf101", "dataset.protocol=clip_benchmark"))
    split_file = replica_folders["sun397_split"]
    with pytest.raises(
        ConfigError, match=r"dataset.split_file is not read by dataset.protocol=clip_benchmark"
    ):
        build_zeroshot_dataset(
            _config(
                compose,
                "dataset=sun397",
                "dataset.protocol=clip_benchmark",
                f"dataset.split_file={split_file}",
            )
        )
    with pytest.raises(UqvlmError, match=r"unknown key dataset.protocols.bayesvlm.coopp"):
        from uqvlm.tasks.keys import check_config_keys

        check_config_keys(compose("dataset=sun397", "+dataset.protocols.bayesvlm.coopp=x"))


# ------------------------------------------------------------------ every real config: classes and sizes

# (option, protocol, real class count): the class counts of the datasets (facts A2/B/C: ImageNet-R 200,
# ImageNet-Sketch 1000 labels, SUN397 397 classes, Food-101 101, EuroSAT's 10 CoOp names; CIFAR-10/100,
# Flowers-102, DTD 47 and UCF101 101 by their definitions).
REAL_CLASSES = [
    ("cifar10", None, 10),
    ("cifar100", None, 100),
    ("food101", None, 101),
    ("flowers102", None, 102),
    ("dtd", None, 47),
    ("eurosat", "bayesvlm", 10),
    ("eurosat", "clip_benchmark", 10),
    ("imagenet-r", "bayesvlm", 200),
    ("imagenet-r", "clip_benchmark", 200),
    ("imagenet-r-folder", "bayesvlm", 200),
    ("imagenet-sketch", "bayesvlm", 1000),
    ("imagenet-sketch", "clip_benchmark", 1000),
    ("sun397", "bayesvlm", 397),
    ("sun397", "clip_benchmark", 397),
    ("ucf101", "bayesvlm", 101),
]


def _full_class_replica(tmp_path: Path, option: str, protocol: str | None, k: int, compose) -> tuple:
    """A replica of ``option``'s source with its real class count and 12 images; returns (overrides, the
    labels of the source's items in order, the expected class names)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    labels = [(i * (k - 1)) // 11 for i in range(12)]  # 0 .. k-1, first and last class included
    section = OmegaConf.to_container(compose(f"dataset={option}").dataset)
    chosen = {**section, **((section.get("protocols") or {}).get(protocol) or {})}
    if chosen.get("kind") == "zhou":
        coop = chosen["coop"]
        if coop == "ucf101":
            names = [f"Action{chr(65 + i % 26)}{chr(65 + i // 26)}x" for i in range(k)]
            entries = [
                (f"{'_'.join(re.findall('[A-Z][^A-Z]*', names[y]))}/v_{names[y]}_g{i:02d}_c01.jpg", y)
                for i, y in enumerate(labels)
            ]
            classnames = ["_".join(re.findall("[A-Z][^A-Z]*", n)) for n in names]
        else:
            classnames = [f"class_{i:03d} scene" for i in range(k)]
            entries = [(f"c{y:03d}/img_{i}.jpg", y) for i, y in enumerate(labels)]
        split = {"train": [], "val": [], "test": [(p, y, classnames[y]) for p, y in entries]}
        split["train"] = [(f"train/{c}.jpg", y, c) for y, c in enumerate(classnames)]  # every class named
        path, images = write_zhou(tmp_path / "zhou", "images", f"split_zhou_{coop}.json", split)
        return [f"dataset.split_file={path}", f"dataset.root={images}"], labels, classnames
    if chosen.get("kind") == "imagenet-r-folder":
        classes = [
            (w, IMAGENET_CLASSNAMES[IMAGENET_WNIDS.index(w)].replace(" ", "_")) for w in IMAGENET_R_WNIDS
        ]
        files = collections.defaultdict(list)
        for i, y in enumerate(labels):
            files[IMAGENET_R_WNIDS[y]].append(f"img_{i:02d}.jpg")
        root = write_imagenet_r_folder(tmp_path / "imagenet-r", classes, files)
        return [f"dataset.root={root}"], labels, [n for _, n in classes]
    if option.startswith("imagenet-r"):  # CLIP_benchmark's classnames: OpenAI's names masked (facts A3)
        classnames = [IMAGENET_CLASSNAMES[i] for i in imagenet_r_mask()]
    elif option.startswith("imagenet-sketch"):
        classnames = list(IMAGENET_CLASSNAMES)
    else:
        classnames = [f"class {i}" for i in range(k)]
    write_hub_repo(tmp_path / "hf" / "hub", chosen["source"], wds_repo_files(classnames, labels, shards=2))
    return [], labels, classnames


@pytest.mark.parametrize(("option", "protocol", "classes"), REAL_CLASSES, ids=lambda v: str(v))
def test_every_real_dataset_config_has_its_classes_and_the_paper_prompt(
    option, protocol, classes, tmp_path, compose, monkeypatch
):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    overrides, labels, classnames = _full_class_replica(tmp_path, option, protocol, classes, compose)
    chosen = [f"dataset.protocol={protocol}"] if protocol else []
    ds = build_zeroshot_dataset(_config(compose, f"dataset={option}", *chosen, *overrides))
    assert len(ds.classnames) == classes and ds.classnames == classnames
    assert ds.prompts()[-1] == [f"An image of a {classnames[-1]}"]  # the paper's template, names verbatim
    assert set(ds.labels().tolist()) <= set(labels) and len(ds) == len(
        _expected_positions(option, protocol, 12)
    )


def _expected_positions(option: str, protocol: str | None, count: int) -> list[int]:
    """The source positions the protocol evaluates, by the published code's own draws."""
    if protocol == "bayesvlm" and option.startswith("imagenet-r"):
        state = np.random.get_state()
        np.random.seed(0)
        perm = np.random.permutation(count)
        np.random.set_state(state)
        return perm[int(0.75 * count) :].tolist()
    if protocol == "bayesvlm" and option == "imagenet-sketch":
        import datasets

        return datasets.Dataset.from_dict({"i": list(range(count))}).train_test_split(
            test_size=0.025, seed=0
        )["test"]["i"]
    return list(range(count))


# -------------------------------------------------------------------------- active-learning domains


def _fake_extractor(seen: list):
    """Features that say which dataset (position in ``seen``) and which image (its number) a row is."""

    def extract(ds, what):
        seen.append(ds)
        labels = torch.tensor([ds[i][1] for i in range(len(ds))], dtype=torch.long)
        numbers = [image_number(ds[i][0]) for i in range(len(ds))]
        acts = torch.tensor([[float(len(seen) - 1), float(n)] for n in numbers], dtype=torch.float64).reshape(
            -1, 2
        )
        return Features(acts, acts.clone()), labels

    return extract


def _al_spec(compose, option: str, *overrides: str) -> dict:
    cfg = compose("task=active_learning", f"task/data={option}", *overrides)
    return OmegaConf.to_container(cfg.task.data, resolve=True)


def _scan_dir(data_dir: Path, class_filter=None, suffixes=(".jpg",)):
    """BayesVLM's scan_dir (homeoffice_da.py / imagenet_da.py @ 855be8b, facts A2)."""
    classes = next(os.walk(data_dir))[1]
    if class_filter is not None:
        classes = [c for c in classes if c in class_filter]
    classes = sorted(classes)
    data = []
    for i, class_name in enumerate(classes):
        for img_path in (data_dir / class_name).iterdir():
            if img_path.suffix in suffixes:
                data.append({"img_path": img_path, "class_id": i})
    return sorted(data, key=lambda x: x["img_path"]), classes


def _published_al(root: Path, domains, target: str, class_filter=None, suffixes=(".jpg",)):
    """The published pool / val / test (paths, per-domain class ids), global RNG as the published code."""
    state = random.getstate()
    try:
        train_all, val_all, test_all = {}, {}, {}
        for d in domains:
            data, _ = _scan_dir(root / d, class_filter, suffixes)
            train_all[d], val_all[d], test_all[d] = _published_domain_code(data)
        pool = [x for d in domains for x in train_all[d]]
        random.shuffle(pool)
    finally:
        random.setstate(state)
    return pool, val_all[target], test_all[target]


def test_officehome_published_protocol_is_the_published_code(compose, replica_folders):
    """facts A2: seed 42, 80/20 then 80/20 (int flooring), pool = train splits of all four domains (target
    included) shuffled by the continuing RNG; class names as the folders spell them."""
    from uqvlm.active.domains import build_domain_data

    root, numbers = replica_folders["officehome"], replica_folders["officehome_numbers"]
    spec = _al_spec(compose, "officehome", f"task.data.root={root}")
    seen: list = []
    data = build_domain_data(spec, _fake_extractor(seen))
    pool, val, test = _published_al(root, OFFICEHOME_DOMAINS, "Clipart")
    assert data.classnames == OFFICEHOME_CLASSES and data.pool_domains == list(OFFICEHOME_DOMAINS)
    for feats, labels, published in (
        (data.pool, data.pool_labels, pool),
        (data.val, data.val_labels, val),
        (data.target, data.target_labels, test),
    ):
        assert feats.activations[:, 1].long().tolist() == [numbers[x["img_path"]] for x in published]
        assert labels.tolist() == [x["class_id"] for x in published]
    floors = {d: int(0.8 * int(0.8 * n)) for d, n in OFFICEHOME_COUNTS.items()}  # 8, 6, 6, 7
    assert collections.Counter(data.pool_domain.tolist()) == {
        i: floors[d] for i, d in enumerate(OFFICEHOME_DOMAINS)
    }
    assert (
        len(data.target_labels) == 10 - int(0.8 * 10)
        and len(data.val_labels) == int(0.8 * 10) - floors["Clipart"]
    )


def test_imagenet_variations_published_protocol_aligns_by_wnid(compose, replica_folders):
    """facts A2: every domain restricted to the target's wnid folders, split as published, pool = train splits
    of A, R and Sketch shuffled by the continuing RNG. The published labels are per-domain sorted indices
    (ImageNet-A lacks ImageNet-R's shark, so its missiles get the shark's index); ours go through the wnid."""
    from uqvlm.active.domains import build_domain_data

    root, numbers = replica_folders["imagenet_variations"], replica_folders["imagenet_variations_numbers"]
    spec = _al_spec(compose, "imagenet-variations", f"task.data.root={root}")
    seen: list = []
    data = build_domain_data(spec, _fake_extractor(seen))
    domains = ["imagenet-a", "imagenet-r", "imagenet-sketch"]
    target_wnids = sorted(VARIATIONS_LAYOUT["imagenet-r"])
    pool, val, test = _published_al(root, domains, "imagenet-r", set(target_wnids), (".jpg", ".JPEG"))
    assert data.class_ids == target_wnids and data.classnames == ["goldfish", "great white shark", "missile"]
    assert data.pool.activations[:, 1].long().tolist() == [numbers[x["img_path"]] for x in pool]
    assert data.target.activations[:, 1].long().tolist() == [numbers[x["img_path"]] for x in test]
    wnid_of = {n: p.parent.name for p, n in numbers.items()}
    for feats, labels in (
        (data.pool, data.pool_labels),
        (data.val, data.val_labels),
        (data.target, data.target_labels),
    ):
        assert [target_wnids[y] for y in labels.tolist()] == [
            wnid_of[int(n)] for n in feats.activations[:, 1]
        ]
    published_a = [
        (x["img_path"].parent.name, x["class_id"]) for x in pool if x["img_path"].parts[-3] == "imagenet-a"
    ]
    assert {w: c for w, c in published_a} == {"n01443537": 0, "n03773504": 1}  # 1 is the shark in R: shifted
    assert "n04008634" not in {wnid_of[int(n)] for n in data.pool.activations[:, 1]}  # projectile: not R's


def test_missile_lands_on_its_wnid_in_the_hub_config(compose, tmp_path, monkeypatch):
    """task/data=imagenet-r-sketch on replicas of wds_imagenet-r and wds_imagenet_sketch with CLIP_benchmark's
    class names (OpenAI's, facts A3): Sketch's two "missile" classes, 657 (n03773504) and 744 (n04008634); only
    the first is ImageNet-R's missile. Aligned by name, the projectiles would join it."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from uqvlm.active.domains import build_domain_data

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    r_missile = IMAGENET_R_WNIDS.index("n03773504")
    r_labels = [r_missile, 0, r_missile, 1] * 5
    sketch_labels = [657, 744, 1, 657, 744] * 4
    hub = tmp_path / "hub"
    write_hub_repo(
        hub,
        "clip-benchmark/wds_imagenet-r",
        wds_repo_files([IMAGENET_CLASSNAMES[i] for i in imagenet_r_mask()], r_labels),
    )
    write_hub_repo(
        hub,
        "clip-benchmark/wds_imagenet_sketch",
        wds_repo_files(IMAGENET_CLASSNAMES, sketch_labels, ext="jpg", first_number=100),
    )
    spec = _al_spec(compose, "imagenet-r-sketch")
    data = build_domain_data(spec, _fake_extractor([]))
    sketch_wnid = {100 + i: IMAGENET_WNIDS[y] for i, y in enumerate(sketch_labels)}
    pool_wnids = [sketch_wnid[int(n)] for n in data.pool.activations[:, 1]]
    assert pool_wnids and [IMAGENET_R_WNIDS[y] for y in data.pool_labels.tolist()] == pool_wnids
    assert "n04008634" not in pool_wnids and "n03773504" in pool_wnids
    by_name = build_domain_data({**spec, "align": "names"}, _fake_extractor([]))
    projectiles = [
        y
        for n, y in zip(by_name.pool.activations[:, 1], by_name.pool_labels.tolist(), strict=True)
        if sketch_wnid[int(n)] == "n04008634"
    ]
    assert projectiles and {by_name.classnames[y] for y in projectiles} == {
        "missile"
    }  # the bug names alignment has


# ------------------------------------------------------------------------------------ end to end, real model

# (dataset option, protocol, the truth of its replica: labels of the source's items in order and names)
LABELS12 = [i % 3 for i in range(12)]


def _zeroshot_runs(folders: dict) -> list[tuple[str, str | None, list[str], list[int], list[str]]]:
    """(option, protocol, overrides, expected labels in evaluation order, expected class names)."""

    def zhou(key):
        entries = json.loads(Path(folders[f"{key}_split"]).read_text())
        names = {y: c for split in entries.values() for _, y, c in split}
        return (
            [f"dataset.split_file={folders[f'{key}_split']}", f"dataset.root={folders[f'{key}_root']}"],
            [y for _, y, _ in entries["test"]],
            [names[i] for i in range(len(names))],
        )

    # The default protocol of every config, and clip_benchmark where it reads another kind of source (the
    # clip_benchmark cuts of ImageNet-R/-Sketch are checked without the model, above).
    one_split = ("cifar10", "cifar100", "food101", "flowers102", "dtd")
    runs = [(o, None, [], FEW_LABELS, SMALL) for o in one_split]
    runs += [(o, "clip_benchmark", [], FEW_LABELS, SMALL) for o in ("eurosat", "sun397")]
    for key in ("eurosat", "sun397", "ucf101"):
        overrides, labels, names = zhou(key)
        runs.append((key, "bayesvlm", overrides, labels, names))
    for option in ("imagenet-r", "imagenet-sketch"):
        labels = [LABELS12[i] for i in _expected_positions(option, "bayesvlm", 12)]
        runs.append((option, "bayesvlm", [], labels, SMALL))
    # The ImageNet-R folder: the .jpg files sorted by path (sketch_0.png and toy_1.JPG are not read).
    jpgs = sorted(p for p in Path(folders["imagenet_r"]).rglob("*") if p.suffix == ".jpg")
    readme = ["n01443537", "n01484850", "n03773504"]
    folder_labels = [readme.index(p.parent.name) for p in jpgs]
    positions = _expected_positions("imagenet-r-folder", "bayesvlm", len(jpgs))
    runs.append(
        (
            "imagenet-r-folder",
            "bayesvlm",
            [f"dataset.root={folders['imagenet_r']}"],
            [folder_labels[i] for i in positions],
            ["goldfish", "great_white_shark", "missile"],
        )
    )
    return runs


@pytest.fixture()
def model_once(monkeypatch):
    """One model load and one checkpoint hash for all the runs of a test (each run still composes, checks
    and runs its config): the ViT-B-32 checkpoint is 605 MB."""
    import uqvlm.models
    from uqvlm.tasks import common

    loaded: dict = {}
    real_load, real_digest = uqvlm.models.load_vlm, common.file_digest

    def load_once(*args, **kw):
        if "vlm" not in loaded:
            loaded["vlm"] = real_load(*args, **kw)
        return loaded["vlm"]

    def digest_once(path):
        if str(path) not in loaded:
            loaded[str(path)] = real_digest(path)
        return loaded[str(path)]

    monkeypatch.setattr(uqvlm.models, "load_vlm", load_once)
    monkeypatch.setattr(common, "file_digest", digest_once)


@pytest.mark.slow
def test_every_real_dataset_config_runs_end_to_end_on_its_replica(
    replica_env, replica_folders, vit_b32_checkpoint, model_once, tmp_path, compose, monkeypatch, one_thread
):
    """``uqvlm run model=clip-b32 dataset=<x> [dataset.protocol=...]`` through the shipped configs, offline, on
    each source's replica: the evaluated items are the protocol's (labels in order, against the published
    code's own draws), the prompts are the paper's over the source's class names, and the table counts them."""
    from uqvlm.cli import run_task
    from uqvlm.tasks import zeroshot

    seen = {}
    real_extract, real_prompts = zeroshot.extract_features, zeroshot.encode_prompts

    def extract(model, dirs, dataset, what):
        feats = real_extract(model, dirs, dataset, what)
        seen["labels"] = feats["targets"].tolist()
        return feats

    def prompts(vlm, class_prompts, **kw):
        seen["prompts"] = class_prompts
        return real_prompts(vlm, class_prompts, **kw)

    monkeypatch.setattr(zeroshot, "extract_features", extract)
    monkeypatch.setattr(zeroshot, "encode_prompts", prompts)
    common = [
        "model=clip-b32",
        f"model.pretrained={vit_b32_checkpoint}",
        "posterior=map",
        "~task.methods.temperature",
        "~task.methods.tta",
        "task.plots=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.results_dir={tmp_path / 'results'}",
    ]
    for option, protocol, overrides, labels, names in _zeroshot_runs(replica_folders):
        chosen = [f"dataset.protocol={protocol}"] if protocol else []
        cfg = compose(*common, f"dataset={option}", *chosen, *overrides)
        seen.clear()
        run_task(cfg)
        where = f"{option} ({protocol})"
        assert seen["labels"] == labels, where
        assert seen["prompts"] == [[f"An image of a {c}"] for c in names], where
        table = pd.read_csv(next((tmp_path / "results" / "zeroshot" / _resolved_name(cfg)).glob("*.csv")))
        assert table.method.tolist() == ["map"] and table.n.tolist() == [len(labels)], where


def _resolved_name(cfg) -> str:
    from uqvlm.data.sections import apply_protocol

    return apply_protocol(OmegaConf.to_container(cfg.dataset, resolve=True))["name"]


@pytest.mark.slow
@pytest.mark.parametrize("option", ["officehome", "imagenet-variations"])
def test_published_active_learning_protocols_run_end_to_end_on_replicas(
    option, replica_folders, vit_b32_checkpoint, model_once, tmp_path, compose, monkeypatch, one_thread
):
    """``uqvlm run task=active_learning task/data=<option> task.data.root=<replica>`` with ViT-B-32: the pool is
    the published one (per-domain int-floored 64 % train splits of every domain, target included), the
    classes are the target's, and the learning-curve table is written."""
    from uqvlm.cli import run_task
    from uqvlm.tasks import active_learning

    captured = {}
    real_build = active_learning.build_domain_data

    def build(spec, extract):
        captured["data"] = real_build(spec, extract)
        return captured["data"]

    monkeypatch.setattr(active_learning, "build_domain_data", build)
    root = replica_folders["officehome" if option == "officehome" else "imagenet_variations"]
    cfg = compose(
        "task=active_learning",
        f"task/data={option}",
        f"task.data.root={root}",
        "model=clip-b32",
        f"model.pretrained={vit_b32_checkpoint}",
        # A real model's own Hessian data (its default is the published factors): LAION-layout local shards.
        "hessian_data=laion400m",
        f"hessian_data.root={write_img2dataset_shards(tmp_path / 'laion', pairs=8)}",
        "hessian_data.n=8",
        "hessian_data.class_batch=4",
        "task.strategies=[random]",
        "task.budgets=[2]",
        "task.seeds=[0]",
        "task.samples=8",
        "task.finetune.epochs=2",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.results_dir={tmp_path / 'results'}",
    )
    run_task(cfg)
    data = captured["data"]
    if option == "officehome":
        counts = OFFICEHOME_COUNTS
        classes = OFFICEHOME_CLASSES
    else:  # each domain restricted to imagenet-r's wnids first
        target = set(VARIATIONS_LAYOUT["imagenet-r"])
        counts = {d: sum(len(f) for w, f in c.items() if w in target) for d, c in VARIATIONS_LAYOUT.items()}
        classes = ["goldfish", "great white shark", "missile"]
    assert data.pool_domains == list(counts) and data.classnames == classes
    floors = [int(0.8 * int(0.8 * n)) for n in counts.values()]
    assert torch.bincount(data.pool_domain, minlength=len(floors)).tolist() == floors
    table = pd.read_csv(next((tmp_path / "results" / "active_learning").glob("*/*.csv")))
    assert table.strategy.tolist() == ["zero-shot", "random"] and table.acc_mean.between(0, 1).all()
