"""Sharded feature extraction: resumable after a crash, keyed by its inputs, bounded per shard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from uqvlm.data.base import ZeroShotDataset, fingerprint_of
from uqvlm.extraction import encode_prompts, extract
from uqvlm.features import Features


class Pixels(ZeroShotDataset):
    """Tiny labelled images whose pixels encode their index; optionally crashes at one index."""

    def __init__(self, n: int, crash_at: int | None = None):
        self.n, self.crash_at = n, crash_at
        self.name, self.split, self.classnames, self.templates = "pixels", "test", ["a", "b", "c"], ["{c}"]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.crash_at:
            raise RuntimeError("killed")
        return Image.new("RGB", (2, 2), (i % 256, i // 256, 7)), i % 3

    def fingerprint(self):
        return fingerprint_of("pixels", self.n)


class LinearVLM:
    """A stand-in VLM: z = W a with a = the flattened pixels; counts what it encodes."""

    def __init__(self):
        self.weight = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
        self.encoded = 0
        self.preprocess = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).flatten() / 255

    def encode_images(self, pixels):
        self.encoded += len(pixels)
        return Features(pixels, pixels @ self.weight.T)

    def encode_texts(self, texts):
        a = torch.tensor([[float(len(t)), float(ord(t[0]))] * 6 for t in texts])
        return Features(a, a @ self.weight.T)


def test_crash_then_resume_reuses_finished_shards(tmp_path):
    kw = dict(
        cache_dir=tmp_path, model_id={"name": "linear"}, dataset_id="pixels", batch_size=8, shard_size=32
    )
    vlm = LinearVLM()
    try:
        extract(vlm, Pixels(100, crash_at=70), **kw)
    except RuntimeError:
        pass
    assert vlm.encoded == 64  # shards 0 and 1 finished before the crash in shard 2
    vlm.encoded = 0
    resumed = extract(vlm, Pixels(100), **kw)
    assert vlm.encoded == 100 - 64
    clean = extract(LinearVLM(), Pixels(100), **{**kw, "cache_dir": tmp_path / "clean"})
    assert torch.equal(resumed["image"].embeddings, clean["image"].embeddings)
    assert torch.equal(resumed["targets"], torch.arange(100) % 3)
    # Independent truth: the embedding of item i is W a_i for its own pixels.
    a = LinearVLM().preprocess(Pixels(100)[57][0])
    torch.testing.assert_close(resumed["image"].embeddings[57], LinearVLM().weight @ a)
    vlm.encoded = 0
    extract(vlm, Pixels(100), **kw)
    assert vlm.encoded == 0  # fully cached


def test_cache_is_keyed_by_model_and_dataset(tmp_path):
    vlm = LinearVLM()
    base = dict(cache_dir=tmp_path, batch_size=16, shard_size=64)
    extract(vlm, Pixels(10), model_id={"name": "a"}, dataset_id="x", **base)
    for model_id, dataset_id in (({"name": "b"}, "x"), ({"name": "a"}, "y")):
        vlm.encoded = 0
        extract(vlm, Pixels(10), model_id=model_id, dataset_id=dataset_id, **base)
        assert vlm.encoded == 10


def test_prompt_features_average_templates_in_activation_space(tmp_path):
    vlm = LinearVLM()
    prompts = [["a x", "bb y"], ["ccc"]]
    f = encode_prompts(vlm, prompts, cache_dir=tmp_path, model_id={"name": "linear"})
    each = vlm.encode_texts(["a x", "bb y", "ccc"])
    torch.testing.assert_close(f.activations[0], each.activations[:2].mean(0))
    torch.testing.assert_close(f.embeddings, f.activations @ vlm.weight.T)


def test_extraction_follows_the_models_device(tmp_path, monkeypatch):
    """The model decides where pixels go: a model on the CPU encodes on the CPU even where CUDA is
    available (it used to be sent the pixels on cuda, "Expected all tensors to be on the same device")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    vlm = LinearVLM()
    out = extract(vlm, Pixels(10), cache_dir=tmp_path, model_id={"name": "l"}, dataset_id="x", batch_size=4)
    assert vlm.encoded == 10 and out["image"].embeddings.device.type == "cpu"


def test_a_device_other_than_the_models_is_refused_before_encoding(tmp_path):
    from uqvlm.devices import DeviceMismatchError

    vlm = LinearVLM()
    with pytest.raises(DeviceMismatchError, match="asked to run on meta but the model lives on cpu"):
        extract(vlm, Pixels(10), cache_dir=tmp_path, model_id={"name": "l"}, dataset_id="x", device="meta")
    assert vlm.encoded == 0
    extract(vlm, Pixels(10), cache_dir=tmp_path, model_id={"name": "l"}, dataset_id="x", device="cpu")
    assert vlm.encoded == 10


def test_workers_tokenize_captions_and_features_equal_the_main_process(tmp_path):
    """With DataLoader workers, captions are tokenized in the workers; the features are those of the
    main process, item by item."""
    from uqvlm.data.base import PairDataset

    class Pairs(PairDataset):
        name = "pairs"

        def __len__(self):
            return 12

        def __getitem__(self, i):
            return Image.new("RGB", (2, 2), (i, 2 * i, 7)), "x" * (i + 1)

        def fingerprint(self):
            return fingerprint_of("pairs", 12)

    class Tokenizing(LinearVLM):
        def tokenizer(self, texts):  # the token ids carry the caption (its length)
            return torch.tensor([[len(t), ord(t[0])] for t in texts])

        def encode_texts(self, ids):
            assert isinstance(ids, torch.Tensor), "captions arrive tokenized"
            a = ids.float().repeat(1, 6)
            return Features(a, a @ self.weight.T)

    kw = dict(model_id={"name": "t"}, dataset_id="pairs", batch_size=5, shard_size=8)
    vlm = Tokenizing()
    vlm.tokenizer = vlm.tokenizer  # a callable attribute, as VLM.tokenizer is
    two = extract(vlm, Pairs(), cache_dir=tmp_path / "w", num_workers=2, **kw)
    zero = extract(vlm, Pairs(), cache_dir=tmp_path / "m", num_workers=0, **kw)
    assert torch.equal(two["text"].activations, zero["text"].activations)
    assert torch.equal(two["image"].embeddings, zero["image"].embeddings)
    assert two["text"].activations[:, 0].tolist() == [float(i + 1) for i in range(12)]
