"""The model wrapper (uqvlm.models.vlm) splits every supported tower exactly at its last layer, and loads offline-first.

Big towers are random-init (no weights can be downloaded here) and built once per module; ViT-L/H run
at a reduced input size and context length, which changes nothing in where the last layer sits.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import open_clip
import pytest
import torch

from uqvlm.errors import WeightsUnavailableError
from uqvlm.features import Features
from uqvlm.models.vlm import VLM, UnsupportedModelError, load_vlm

try:
    import uqvlm.models.tiny  # noqa: F401

    HAVE_TINY = True
except ImportError:
    HAVE_TINY = False

TEXTS = ["an image of a cat.", "an image of a dog on the grass."]

# (model name, open_clip kwargs, expected image head, expected text head, has residual)
CASES = {
    "ViT-B-32": ({}, "visual.proj", "text_projection", False),
    "ViT-L-14": (
        {"force_image_size": 28, "force_context_length": 8},
        "visual.proj",
        "text_projection",
        False,
    ),
    "ViT-H-14": (
        {"force_image_size": 28, "force_context_length": 8},
        "visual.proj",
        "text_projection",
        False,
    ),
    "ViT-B-16-SigLIP-256": ({}, "visual.trunk.attn_pool.mlp.fc2", "text.text_projection", True),
    "convnext_tiny": ({}, "visual.head.proj", "text_projection", False),
}
if HAVE_TINY:
    CASES["uqvlm-tiny"] = ({}, "visual.proj", "text_projection", False)


def _image_size(vlm: VLM) -> int:
    size = vlm.model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _reconstruct(f: Features, head) -> torch.Tensor:
    z = f.activations @ head.weight.T
    if head.bias is not None:
        z = z + head.bias
    if f.residuals is not None:
        z = z + f.residuals
    return z


def _close(a: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(a, ref, atol=tol * scale, rtol=tol)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    kwargs, img_head, txt_head, has_res = CASES[request.param]
    vlm = load_vlm(request.param, None, **kwargs)
    yield request.param, vlm, img_head, txt_head, has_res
    del vlm
    gc.collect()


def test_image_tower_is_split_exactly(case):
    name, vlm, img_head, _, has_res = case
    assert vlm.image_head_name == img_head
    x = torch.randn(1, 3, _image_size(vlm), _image_size(vlm), generator=torch.Generator().manual_seed(1))
    f = vlm.encode_images(x)
    with torch.no_grad():
        ref = vlm.model.encode_image(x, normalize=False)
    head = vlm.image_head
    D, p = head.weight.shape
    assert f.activations.shape == (1, p) and f.embeddings.shape == (1, D) == ref.shape
    assert (f.residuals is not None) == has_res
    assert head.has_bias == has_res  # SigLIP's fc2 has a bias; CLIP's projections have none
    _close(f.embeddings, ref)
    _close(_reconstruct(f, head), ref)


def test_text_tower_is_split_exactly(case):
    name, vlm, _, txt_head, _ = case
    assert vlm.text_head_name == txt_head
    if "SigLIP" in name:  # its tokenizer lives on the HF hub: feed token ids
        ids = torch.randint(
            1, 30_000, (2, vlm.model.context_length), generator=torch.Generator().manual_seed(2)
        )
        with pytest.raises(WeightsUnavailableError):
            vlm.tokenizer  # noqa: B018  (offline, and transformers is not installed)
        f = vlm.encode_texts(ids)
    else:
        ids = vlm.tokenizer(TEXTS)
        f = vlm.encode_texts(TEXTS)  # strings go through the same tokenizer
    with torch.no_grad():
        ref = vlm.model.encode_text(ids, normalize=False)
    head = vlm.text_head
    assert f.activations.shape == (2, head.weight.shape[1]) and f.residuals is None
    assert head.has_bias == ("SigLIP" in name)
    _close(f.embeddings, ref)
    _close(_reconstruct(f, head), ref)


def test_scalars_and_projection_restored(case):
    name, vlm, _, _, _ = case
    assert vlm.logit_scale == pytest.approx(float(vlm.model.logit_scale.detach()))
    assert (vlm.logit_bias is not None) == ("SigLIP" in name)
    if hasattr(vlm.model.visual, "proj"):  # the Parameter removed during capture is back, and registered
        assert isinstance(vlm.model.visual.proj, torch.nn.Parameter)
        assert any(n == "visual.proj" for n, _ in vlm.model.named_parameters())


@pytest.mark.skipif(not HAVE_TINY, reason="uqvlm.models.tiny is not present")
def test_tiny_float64_exact():
    vlm = load_vlm("uqvlm-tiny", None)
    vlm.model.double()
    x = torch.randn(3, 3, _image_size(vlm), _image_size(vlm), dtype=torch.float64)
    f = vlm.encode_images(x)
    with torch.no_grad():
        ref = vlm.model.encode_image(x)
    torch.testing.assert_close(_reconstruct(f, vlm.image_head), ref, atol=1e-12, rtol=1e-12)
    t = vlm.encode_texts(TEXTS)
    with torch.no_grad():
        ref_t = vlm.model.encode_text(vlm.tokenizer(TEXTS))
    torch.testing.assert_close(_reconstruct(t, vlm.text_head), ref_t, atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(not HAVE_TINY, reason="uqvlm.models.tiny is not present")
def test_projection_restored_after_error():
    vlm = load_vlm("uqvlm-tiny", None)
    proj = vlm.model.visual.proj
    with pytest.raises(RuntimeError):
        vlm.encode_images(torch.randn(1, 5, 7, 7))  # wrong channel count: conv fails mid-forward
    assert vlm.model.visual.proj is proj


# ----------------------------------------------------------------------------- names and weights


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(ValueError, match="ViT-B-32"):
        load_vlm("ViT-B-23")
    with pytest.raises(ValueError, match="ViT-L-14"):
        load_vlm("vit-l-14")


def test_unknown_tag_lists_tags():
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):
        load_vlm("ViT-B-32", "laion2b_s34b_b97k")


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_vlm("ViT-B-32", str(tmp_path / "nope.bin"))


def test_offline_tag_fails_fast(monkeypatch, tmp_path, connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsUnavailableError) as err:
        load_vlm("ViT-B-32", "laion2b_s34b_b79k")
    assert connections == []  # offline: not even a probe
    msg = str(err.value)
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in msg and "huggingface-cli download" in msg
    assert "model.pretrained=" in msg


def test_offline_hf_hub_fails_fast(monkeypatch, tmp_path, connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsUnavailableError, match="timm/ViT-B-16-SigLIP-256"):
        load_vlm("ViT-B-16-SigLIP-256", "hf-hub:timm/ViT-B-16-SigLIP-256")
    assert connections == []


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch, tmp_path, connections):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsUnavailableError):
        load_vlm("ViT-B-32", "laion2b_s34b_b79k")
    assert len(connections) <= 1  # at most one reachability probe, then offline: no retry loops


# A fake hub cache holding a tiny model, to check the cache paths without the network.

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        (snap / name).write_bytes(data)


@pytest.fixture()
def tiny_state(tmp_path):
    if not HAVE_TINY:
        pytest.skip("uqvlm.models.tiny is not present")
    from uqvlm.models.tiny import register_model_configs

    register_model_configs()
    torch.manual_seed(123)
    model = open_clip.create_model("uqvlm-tiny")
    path = tmp_path / "tiny.bin"
    torch.save(model.state_dict(), path)
    return model.state_dict(), path


def _same_weights(vlm: VLM, state: dict) -> bool:
    return all(torch.equal(vlm.model.state_dict()[k], v) for k, v in state.items())


def test_checkpoint_file(tiny_state):
    state, path = tiny_state
    vlm = load_vlm("uqvlm-tiny", str(path))
    assert _same_weights(vlm, state)


def test_tag_served_from_hub_cache(tiny_state, tmp_path, monkeypatch):
    from open_clip import pretrained as oc_pretrained

    state, path = tiny_state
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    tag = oc_pretrained._pcfg(hf_hub="uqvlm-test/tiny-fake/", mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    monkeypatch.setitem(oc_pretrained._PRETRAINED, "uqvlm-tiny", {"fake": tag})
    with pytest.raises(WeightsUnavailableError, match="uqvlm-test/tiny-fake"):
        load_vlm("uqvlm-tiny", "fake")
    _fake_repo(tmp_path / "hub", "uqvlm-test/tiny-fake", {"open_clip_pytorch_model.bin": path.read_bytes()})
    vlm = load_vlm("uqvlm-tiny", "fake")
    assert _same_weights(vlm, state)
    assert "0.1, 0.2, 0.3" in repr(vlm.preprocess)  # the tag's normalisation, as open_clip would use


def _open_clip_config() -> bytes:
    from uqvlm.models.tiny import CONFIG_DIR

    model_cfg = json.loads((CONFIG_DIR / "uqvlm-tiny.json").read_text())
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}}
    return json.dumps(cfg).encode()


def test_hf_hub_served_from_cache(tiny_state, tmp_path, monkeypatch):
    state, path = tiny_state
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_repo(
        tmp_path / "hub",
        "uqvlm-test/tiny-hub",
        {"open_clip_config.json": _open_clip_config(), "open_clip_pytorch_model.bin": path.read_bytes()},
    )
    for vlm in (load_vlm("hf-hub:uqvlm-test/tiny-hub"), load_vlm("uqvlm-tiny", "hf-hub:uqvlm-test/tiny-hub")):
        assert _same_weights(vlm, state)
        assert "0.4" in repr(vlm.preprocess)
        assert vlm.encode_texts(TEXTS).embeddings.shape == (2, 32)


def test_hf_hub_config_without_weights(tiny_state, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_repo(tmp_path / "hub", "uqvlm-test/no-weights", {"open_clip_config.json": _open_clip_config()})
    with pytest.raises(WeightsUnavailableError, match="open_clip_model.safetensors"):
        load_vlm("hf-hub:uqvlm-test/no-weights")  # open_clip alone would silently init randomly


def test_local_dir(tiny_state, tmp_path):
    state, path = tiny_state
    d = tmp_path / "dir"
    d.mkdir()
    (d / "open_clip_config.json").write_bytes(_open_clip_config())
    with pytest.raises(WeightsUnavailableError, match="no checkpoint"):
        load_vlm("uqvlm-tiny", f"local-dir:{d}")
    (d / "open_clip_pytorch_model.bin").write_bytes(path.read_bytes())
    vlm = load_vlm("uqvlm-tiny", f"local-dir:{d}")
    assert _same_weights(vlm, state)
    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_vlm(f"local-dir:{tmp_path / 'missing'}")


def test_unsupported_tower_is_reported():
    # ModifiedResNet's attention pool applies c_proj through F.multi_head_attention_forward: no hook point.
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        load_vlm("RN50", None, force_image_size=64)


def test_bad_precision():
    with pytest.raises(ValueError, match="precision"):
        load_vlm("ViT-B-32", None, precision="fp8")
