"""The published BayesVLM factors: fetched from a base URL (a local HTTP server stands in for GitHub),
verified against the table of their digests, recorded with their N, and used as the KFAC posterior of the
matching open_clip architecture, EPIG's updates included."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import threading

import pandas as pd
import pytest
import torch

from uqvlm import published
from uqvlm.cli import main, run_task
from uqvlm.laplace import likelihood_for
from uqvlm.laplace.reference import load_published_factors
from uqvlm.tasks.common import load_model, load_settings, prepare_dirs
from uqvlm.tasks.hessian import fit_posteriors

B32 = "CLIP-ViT-B-32-laion2B-s34B-b79K"


def git_hash_object(path) -> str | None:
    """git's own blob id of a file (the independent truth for the table's SHA-1s), None without git."""
    try:
        out = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


class FactorServer:
    """A static HTTP server on 127.0.0.1 over ``root``, counting the GET requests it answers."""

    def __init__(self, root):
        self.root, self.requests = root, []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hessians"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(root):
        servers.append(FactorServer(root))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _synthetic_set(folder, d_img: int = 6, d_txt: int = 4, seed: int = 0) -> None:
    """Five files in the published layout: positive-definite factors and the prior JSON."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    for name, d in (("A_img", d_img), ("B_img", d_txt), ("A_txt", d_txt), ("B_txt", d_txt)):
        x = torch.randn(3 * d, d, generator=g)
        torch.save(x.T @ x / (3 * d), folder / f"{name}_analytic.pt")
    (folder / published.FILES[-1]).write_text(
        json.dumps({"lambda_img": 10.0, "n_img": 1.0, "lambda_txt": 20.0, "n_txt": 1.0}, indent=4)
    )


@pytest.fixture
def fake_set(tmp_path, monkeypatch):
    """A published set 'test-set' of tiny synthetic files served under hessians/hessian_test-set/, its
    table entry built from hashlib and git (independent of uqvlm's own hashing)."""
    folder = tmp_path / "served" / "hessians" / "hessian_test-set"
    _synthetic_set(folder)
    entry = {}
    for f in published.FILES:
        data = (folder / f).read_bytes()
        blob = git_hash_object(folder / f) or hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        entry[f] = published.FactorFile(blob, len(data), hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(published.PUBLISHED_SETS, "test-set", entry)
    return tmp_path / "served", folder


def _fetch_args(server, cache, checkpoint, tmp_path, extra=()):
    return [
        "fetch",
        "task=hessian",
        "model=clip-b32",
        f"model.pretrained={tmp_path / 'checkpoint.bin'}",
        f"hessian_data.checkpoint={checkpoint}",
        f"hessian_data.base_url={server.base_url}",
        f"paths.cache_dir={cache}",
        *extra,
    ]


def test_fetch_downloads_verifies_and_a_second_run_fetches_nothing(fake_set, serve, tmp_path, capsys):
    served, folder = fake_set
    (tmp_path / "checkpoint.bin").write_bytes(b"a checkpoint file stands here")
    server = serve(served)
    cache = tmp_path / "cache"
    main(_fetch_args(server, cache, "test-set", tmp_path))  # exit status 0: returns
    out = " ".join(capsys.readouterr().out.split())
    assert "fetched published factors test-set" in out and "ready" in out
    got = published.cache_folder(cache, "test-set")
    for f in published.FILES:
        assert (got / f).read_bytes() == (folder / f).read_bytes()
    assert sorted(server.requests) == sorted(f"/hessians/hessian_test-set/{f}" for f in published.FILES)

    main(_fetch_args(server, cache, "test-set", tmp_path))
    out = " ".join(capsys.readouterr().out.split())
    assert "present published factors test-set" in out and "fetched" not in out
    assert len(server.requests) == len(published.FILES), "the second run downloaded again"


def test_a_corrupted_file_is_refused_and_nothing_partial_is_left(fake_set, serve, tmp_path, capsys):
    served, folder = fake_set
    (tmp_path / "checkpoint.bin").write_bytes(b"a checkpoint file stands here")
    bad = folder / "A_txt_analytic.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    bad.write_bytes(bytes(data))
    server = serve(served)
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_info:
        main(_fetch_args(server, cache, "test-set", tmp_path))
    assert exit_info.value.code == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "failed" in out and "A_txt_analytic.pt: SHA-256" in out
    got = published.cache_folder(cache, "test-set")
    assert sorted(p.name for p in got.iterdir() if not p.name.endswith(".lock")) == sorted(
        f for f in published.FILES if f != "A_txt_analytic.pt"
    ), "the corrupted file (or a temporary file) was left in the cache"


def test_a_run_downloads_the_factors_it_needs_and_refuses_a_corrupted_cache(fake_set, serve, tmp_path):
    served, _folder = fake_set
    server = serve(served)
    section = {"checkpoint": "test-set", "base_url": server.base_url, "dir": None}
    got = published.published_dir(section, "ViT-B-32", None, tmp_path / "cache")
    assert len(server.requests) == 5
    # A damaged cached file is fetched again, not used.
    (got / "B_img_analytic.pt").write_bytes(b"garbage")
    assert published.published_dir(section, "ViT-B-32", None, tmp_path / "cache") == got
    assert len(server.requests) == 6
    # Unreachable and missing: one clear error naming the ways to provide the factors.
    (got / "B_img_analytic.pt").unlink()
    server.close()
    with pytest.raises(published.DataUnavailableError, match=r"uqvlm fetch .* hessian_data\.dir="):
        published.published_dir(section, "ViT-B-32", None, tmp_path / "cache")


def test_the_table_holds_the_real_vit_b_32_files(reference_hessians):
    """Sizes, SHA-256 and git blob ids of the published ViT-B/32 set against the files themselves."""
    for f in published.FILES:
        path = reference_hessians / f
        data = path.read_bytes()
        expected = published.PUBLISHED_SETS[B32][f]
        assert expected.size == len(data) and expected.sha256 == hashlib.sha256(data).hexdigest()
        if (blob := git_hash_object(path)) is not None:
            assert expected.blob_sha1 == blob
        published.verify_file(path, expected)


def test_the_table_has_five_files_per_set_and_a_set_per_paper_model():
    assert all(set(files) == set(published.FILES) for files in published.PUBLISHED_SETS.values())
    assert set(published.MODEL_SETS.values()) == set(published.PUBLISHED_SETS)
    # Every file has a git blob id (40 hex digits); the 6 whose blobs were not seen have no size / SHA-256.
    files = [f for s in published.PUBLISHED_SETS.values() for f in s.values()]
    assert all(len(f.blob_sha1) == 40 and int(f.blob_sha1, 16) >= 0 for f in files)
    assert sum(f.sha256 is None for f in files) == 6


def test_git_blob_sha1_is_gits(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(range(256)) * 3)
    blob = git_hash_object(path)
    if blob is None:
        pytest.skip("git is not installed")
    assert published.git_blob_sha1(path.read_bytes()) == blob


def test_a_local_folder_of_other_bytes_is_refused_for_a_published_set(reference_hessians, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference_hessians, copy)
    section = {"checkpoint": B32, "base_url": None, "dir": str(copy)}
    assert published.published_dir(section, "ViT-B-32", None, tmp_path / "cache") == copy
    (copy / published.FILES[-1]).write_text('{"lambda_img": 1.0, "lambda_txt": 1.0}')
    with pytest.raises(published.FactorSetError, match="not the published CLIP-ViT-B-32"):
        published.published_dir(section, "ViT-B-32", None, tmp_path / "cache")


# ------------------------------------------------------------------------- the factors in the tasks
def compose_published(compose, reference_hessians, tmp_path):
    overrides = [
        "model=clip-b32",
        "model.pretrained=null",
        "model.batch_size=8",
        f"hessian_data.dir={reference_hessians}",
        "posterior.evidence_variant=reference",
        "posterior.n=1",
        "dataset=shapes-sketch",
        "dataset.n=6",
        "~task.methods.temperature",
        "~task.methods.tta",
        "task.plots=false",
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.results_dir={tmp_path}/results",
    ]
    return compose(*overrides)


def test_factors_become_the_posterior_of_vit_b_32(reference_hessians, tmp_path, compose):
    settings = load_settings(compose_published(compose, reference_hessians, tmp_path))
    dirs = prepare_dirs(settings.paths)
    model = load_model(settings, dirs)
    posts, ident = fit_posteriors(settings.hessian_data, model, dirs, "kfac")
    factors = load_published_factors(reference_hessians)
    a = factors["A_img"]
    torch.testing.assert_close(posts["image"].A, (a + a.T) / 2, rtol=1e-12, atol=1e-9)
    assert posts["image"].last_layer.weight.shape == (512, 768)
    assert posts["text"].last_layer.weight.shape == (512, 512)
    # N is the published pair count, so the posteriors can be extended (EPIG's with_point).
    assert posts["image"].num_data == posts["text"].num_data == 327680
    # The identity is the files' bytes, not where they lie.
    digests = {f: hashlib.sha256((reference_hessians / f).read_bytes()).hexdigest() for f in published.FILES}
    assert ident == {"published": digests, "num_data": 327680}
    # EPIG's updates add curvature to them under the model's likelihood.
    assert posts["image"].likelihood == posts["text"].likelihood == likelihood_for(model.vlm)


def test_zeroshot_run_with_published_factors(reference_hessians, tmp_path, compose):
    run_task(compose_published(compose, reference_hessians, tmp_path))
    table = pd.read_csv(tmp_path / "results" / "zeroshot" / "shapes-sketch" / "ViT-B-32.csv")
    assert list(table.method) == ["map", "bayesvlm-kfac", "bayesvlm-kfac-mc"]
    assert (table.n == 6).all()
    assert table.nll.notna().all()


def test_active_learning_with_epig_on_the_published_vit_b_32_factors(
    reference_hessians, vit_b32_checkpoint, serve, tmp_path, compose
):
    """EPIG extends the published posterior with each pick (with_point needs N): two picks on ViT-B-32 (a
    random-init checkpoint file of the real architecture) with the published factors, downloaded from a
    replica of the repository's folder. Pool and target: the shapes world, a few images per domain."""
    served = tmp_path / "served"
    shutil.copytree(reference_hessians, served / "hessians" / f"hessian_{B32}")
    server = serve(served)
    cfg = compose(
        "task=active_learning",
        "model=clip-b32",
        f"model.pretrained={vit_b32_checkpoint}",
        "model.batch_size=16",
        f"hessian_data.checkpoint={B32}",
        f"hessian_data.base_url={server.base_url}",
        "task.strategies=[epig]",
        "task.budgets=[2]",
        "task.seeds=[0]",
        "task.samples=8",
        "task.finetune.epochs=2",
        "task.data.sizes.train=2",
        "task.data.sizes.val=2",
        "task.data.sizes.test=4",
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.results_dir={tmp_path}/results",
    )
    settings = load_settings(cfg)
    assert settings.hessian_data.num_data == 327680 and settings.task.structure == "kfac"
    run_task(cfg)
    assert len(server.requests) == len(published.FILES)
    table = pd.read_csv(tmp_path / "results" / "active_learning" / "shapes-sketch" / "ViT-B-32.csv")
    row = table[(table.strategy == "epig") & (table.budget == 2)]
    assert len(row) == 1 and row.acc_mean.notna().all() and row.nll_mean.notna().all()
    (selections,) = (tmp_path / "results" / "active_learning" / "shapes-sketch").glob(
        "*.rows/*/*.selections.json"
    )
    picks = json.loads(selections.read_text())["selections"]["epig"]["0"]
    assert len(picks) == len(set(picks)) == 2
