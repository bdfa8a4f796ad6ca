"""Cache entries are atomic, checksummed and keyed: corrupt or mismatched entries are rebuilt."""

import os
import threading

import pytest
import torch

from uqvlm.cache import CacheCorruptError, cache_key, get_or_build, load_entry, load_verified, save_entry


def test_roundtrip_and_checksum(tmp_path):
    path = tmp_path / "e.pt"
    obj = {"meta": {"key": "k"}, "x": torch.arange(10.0)}
    save_entry(path, obj)
    assert torch.equal(load_entry(path)["x"], obj["x"])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError):
        load_entry(path)
    assert load_verified(path) is None


def test_truncated_file_is_rebuilt(tmp_path):
    path = tmp_path / "e.pt"
    save_entry(path, {"meta": {"key": "a"}, "x": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:-100])
    calls = []
    out = get_or_build(
        path, lambda: calls.append(1) or {"meta": {"key": "a"}, "x": torch.zeros(3)}, {"key": "a"}
    )
    assert calls == [1] and torch.equal(out["x"], torch.zeros(3))
    assert torch.equal(load_entry(path)["x"], torch.zeros(3))


def test_mismatched_key_is_rebuilt(tmp_path):
    path = tmp_path / "e.pt"
    save_entry(path, {"meta": {"key": "old"}, "x": torch.ones(2)})
    out = get_or_build(path, lambda: {"meta": {"key": "new"}, "x": torch.zeros(2)}, {"key": "new"})
    assert torch.equal(out["x"], torch.zeros(2))


def test_failed_build_leaves_nothing(tmp_path):
    path = tmp_path / "e.pt"

    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        get_or_build(path, boom)
    assert not path.exists()
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_concurrent_builders_build_once(tmp_path):
    path = tmp_path / "e.pt"
    calls = []

    def build():
        calls.append(1)
        return {"meta": {"key": "k"}, "x": torch.randn(100)}

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(get_or_build(path, build, {"key": "k"})))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(torch.equal(r["x"], results[0]["x"]) for r in results)


def test_cache_key_depends_on_every_part():
    base = cache_key(model="m", data="d", n=1)
    assert base == cache_key(data="d", n=1, model="m")
    assert len({base, cache_key(model="m2", data="d", n=1), cache_key(model="m", data="d", n=2)}) == 3


def test_posteriors_another_state_version_cached_are_rebuilt(
    tmp_path, tiny_checkpoint, settings_of, monkeypatch
):
    """A cached posterior of another state format sits under another key: it is rebuilt, never misread
    (nor refused), and the posteriors come back with the model's likelihood."""
    from uqvlm.laplace import base, likelihood_for
    from uqvlm.tasks import hessian
    from uqvlm.tasks.common import load_model, prepare_dirs

    settings = settings_of(
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.results_dir={tmp_path / 'results'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"model.pretrained={tiny_checkpoint}",
        "hessian_data.n=64",
        "hessian_data.class_batch=32",
    )
    dirs = prepare_dirs(settings.paths)
    model = load_model(settings, dirs)
    # An older uqvlm writes its entry ...
    monkeypatch.setattr(base, "STATE_VERSION", base.STATE_VERSION - 1)
    monkeypatch.setattr(hessian, "STATE_VERSION", base.STATE_VERSION)
    old, _ = hessian.fit_posteriors(settings.hessian_data, model, dirs, "kfac")
    monkeypatch.undo()
    # ... which this one leaves alone.
    posts, ident = hessian.fit_posteriors(settings.hessian_data, model, dirs, "kfac")
    assert len(list((tmp_path / "cache" / "posteriors").glob("kfac-*.pt"))) == 2
    likelihood = likelihood_for(model.vlm)
    assert posts["image"].likelihood == posts["text"].likelihood == likelihood
    assert ident["likelihood"] == likelihood.state() and ident["state_version"] == base.STATE_VERSION
    torch.testing.assert_close(posts["image"].B, old["image"].B, rtol=0, atol=0)
