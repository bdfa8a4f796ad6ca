"""The device policy (the model owns its device) and the extraction speed-ups (channels-last, compile,
loader workers, the largest batch that fits), checked on whatever device runs the suite."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from uqvlm.devices import (
    DeviceMismatchError,
    autocast_for,
    device_of,
    largest_fitting_batch,
    loader_workers,
    model_device,
)
from uqvlm.errors import UqvlmError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from uqvlm.models import load_vlm

    def make():
        return load_vlm("uqvlm-tiny", str(tiny_checkpoint), device=DEVICE)

    return make


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 32, 32, generator=g), ["a red circle", "a blue star", "a green heart"]


def _assert_features_close(got, want, tol: float = 1e-5) -> None:
    for name in ("activations", "embeddings"):
        a, b = getattr(got, name).cpu(), getattr(want, name).cpu()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


def test_the_vlm_owns_its_device_and_moves_with_it(tiny, inputs):
    vlm = tiny()
    assert device_of(vlm) == vlm.device == torch.device(DEVICE)
    pixels, captions = inputs
    f = vlm.encode_images(pixels)  # CPU pixels go to the model
    assert f.embeddings.device.type == DEVICE
    moved = vlm.to("cpu")
    assert moved is vlm and vlm.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in vlm.model.parameters())
    _assert_features_close(vlm.encode_images(pixels), f)
    assert vlm.image_head.weight.device.type == "cpu"


def test_a_requested_device_must_be_the_models():
    layer = torch.nn.Linear(2, 2)
    assert model_device(layer) == torch.device("cpu") == model_device(layer, "cpu")
    with pytest.raises(DeviceMismatchError, match="asked to run on meta but the model lives on cpu"):
        model_device(layer, "meta", "feature extraction")
    assert device_of(object()) == torch.device("cpu")  # a stand-in without parameters or device


def test_channels_last_gives_the_same_features(tiny, inputs):
    pixels, _ = inputs
    eager = tiny().encode_images(pixels)
    _assert_features_close(tiny().channels_last().encode_images(pixels), eager)


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                not os.environ.get("UQVLM_TEST_INDUCTOR") or shutil.which("c++") is None,
                reason="inductor compiles for about 70 s on a 2-core CPU and needs a C++ compiler: set "
                "UQVLM_TEST_INDUCTOR=1 to run it (the aot_eager case always runs)",
            ),
        ),
    ],
)
def test_compiled_encoders_equal_eager_in_fp32(tiny, inputs, backend):
    """torch.compile keeps the split: the captured activations and the embeddings equal eager's."""
    torch._dynamo.reset()
    pixels, captions = inputs
    eager = tiny()
    compiled = tiny().compile(backend=backend)
    _assert_features_close(compiled.encode_images(pixels), eager.encode_images(pixels))
    _assert_features_close(compiled.encode_texts(captions), eager.encode_texts(captions))
    # Another batch size (the last batch of a shard) too.
    _assert_features_close(compiled.encode_images(pixels[:5]), eager.encode_images(pixels[:5]))
    # The projection removed during capture is back, and the head is the model's.
    assert torch.equal(compiled.image_head.weight, compiled.model.visual.proj.detach().T)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_fp32_is_ieee_on_cuda_and_amp_is_autocast():
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with autocast_for(torch.device("cuda"), "fp32"):
        assert conv.fp32_precision == "ieee"  # cuDNN convolutions are TF32 by default
    assert conv.fp32_precision == before
    assert isinstance(autocast_for(torch.device("cuda"), "bf16"), torch.autocast)
    with autocast_for(torch.device("cpu"), "fp32"):
        assert conv.fp32_precision == before


def test_loader_workers_are_sized_to_the_machine():
    assert loader_workers("auto", torch.device("cpu")) == 0
    auto = loader_workers("auto", torch.device("cuda"))
    assert 1 <= auto <= 16 and auto <= max(1, len(os.sched_getaffinity(0)) - 1)
    assert loader_workers(3, torch.device("cuda")) == 3


def test_largest_fitting_batch_doubles_until_memory_runs_out():
    tried = []

    def run(batch: int) -> None:
        tried.append(batch)
        if batch > 300:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    assert largest_fitting_batch(run, start=64, cap=4096) == 256
    assert tried == [64, 128, 256, 512]
    assert largest_fitting_batch(lambda b: None, start=64, cap=1024) == 1024
    with pytest.raises(UqvlmError, match="not even a batch of 512 fits"):
        largest_fitting_batch(run, start=512)


def test_batch_size_auto_and_workers_auto_resolve_where_the_model_loads(
    tmp_path, tiny_checkpoint, settings_of
):
    from uqvlm.tasks.common import CPU_BATCH, load_model, prepare_dirs

    settings = settings_of(
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.results_dir={tmp_path / 'results'}",
        f"model.pretrained={tiny_checkpoint}",
        "model.batch_size=auto",
        "device=cpu",
    )
    assert settings.num_workers == "auto" and settings.compile is False
    model = load_model(settings, prepare_dirs(settings.paths))
    assert (model.batch_size, model.num_workers, model.device) == (CPU_BATCH, 0, torch.device("cpu"))


def test_monte_carlo_samples_do_not_depend_on_the_logits_device():
    """A CPU generator draws on the CPU whatever the logits' device, so a seed gives the same predictive
    on every device."""
    from uqvlm.probcosine import mc_log_probs

    g = torch.Generator().manual_seed(3)
    mean = torch.randn(4, 5, generator=g, dtype=torch.float64)
    var = torch.rand(4, 5, generator=g, dtype=torch.float64)
    here = mc_log_probs(mean.to(DEVICE), var.to(DEVICE), 200, torch.Generator().manual_seed(0)).cpu()
    cpu = mc_log_probs(mean, var, 200, torch.Generator().manual_seed(0))
    torch.testing.assert_close(here, cpu, rtol=1e-12, atol=1e-12)
