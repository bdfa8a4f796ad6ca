"""``task=overhead``: what the BayesVLM predictive costs on top of the deterministic model (paper: < 5%
runtime, < 0.11% GFLOPs), for the run's model, on the run's device.

Counted (``torch.utils.flop_counter``, :mod:`uqvlm.studies.overhead`): the forward FLOPs of each encoder
per input, and of the MAP and BayesVLM (KFAC, probit) predictives for ``task.batch`` images against K
classes. Timed: MAP vs BayesVLM end to end from pixels (image encoder + predictive against cached class
features) and from cached features (the predictive alone), in turns, the fastest of several rounds. The
two pixel paths run the same encoder, so BayesVLM's extra time from pixels is its predictive's extra
time: ``runtime_overhead`` divides that (from the cached-feature timings, which barely vary) by MAP's
time from pixels; ``runtime_overhead_direct`` compares the two pixel timings themselves, which on a
loaded machine vary by tens of percent between runs.
Posteriors and class features are synthetic, of the model's shapes: cost
depends on shapes only, so random-init weights (``model.pretrained=null``) do.

Each model writes ``results/overhead/<device>/<model>.*``; every run then rebuilds
``results/overhead/<device>/summary.*`` and ``summary.png`` from all models' tables there, so a multirun
over models fills one table.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pandas as pd
import torch

from uqvlm.cache import atomic_write
from uqvlm.console import console
from uqvlm.data.registry import build_zeroshot_dataset
from uqvlm.devices import intra_op_threads, resolve_device
from uqvlm.results import model_slug
from uqvlm.settings import OverheadSettings, RunSettings
from uqvlm.studies.overhead import (
    bayesvlm_log_probs,
    encoder_flops,
    map_log_probs,
    overhead_summary,
    per_image_overhead,
    plot_overhead,
    predictive_costs,
    synthetic_kfac_inputs,
    time_call,
)
from uqvlm.studies.report import OVERHEAD_FLOPS_BOUND, OVERHEAD_RUNTIME_BOUND
from uqvlm.tasks.common import TaskResult, load_model, prepare_dirs
from uqvlm.tasks.study import finished_at, write_study

STUDY = "overhead"
SUMMARY = "summary"


def output_location(settings: RunSettings) -> tuple[Path, str]:
    device = resolve_device(settings.device).type
    return Path(settings.paths.results_dir) / STUDY / device, model_slug(settings.model)


def finished_record(settings: RunSettings) -> Path | None:
    return finished_at(*output_location(settings), settings)


def class_counts(settings: RunSettings) -> list[int]:
    """The K values of ``task.classes``, ``dataset`` read as the evaluated dataset's class count."""
    task: OverheadSettings = settings.task
    counts = []
    for k in task.classes:
        if k == OverheadSettings.DATASET_K:
            k = len(build_zeroshot_dataset(settings.dataset.section).classnames)
        counts.append(int(k))
    return list(dict.fromkeys(counts))


def timings(vlm, pixels, features, text, posts, repeats: int, warmup: int) -> dict[str, float]:
    """Wall seconds of MAP and BayesVLM from ``pixels`` (image encoder + predictive against the cached
    class features ``text``) and from cached image ``features`` (the predictive alone): the fastest of
    ``repeats`` rounds, the four timed in turns within each round. On a shared machine other load only
    ever slows a call down, so the fastest is the least disturbed, and turns expose all four to the
    same drift."""
    scale, bias = vlm.logit_scale, vlm.logit_bias
    fns = {
        "map_pixels": lambda: map_log_probs(vlm.encode_images(pixels), text, scale, bias),
        "bayesvlm_pixels": lambda: bayesvlm_log_probs(vlm.encode_images(pixels), text, posts, scale, bias),
        "map_features": lambda: map_log_probs(features, text, scale, bias),
        "bayesvlm_features": lambda: bayesvlm_log_probs(features, text, posts, scale, bias),
    }
    device = pixels.device
    # On a shared CPU intra-op threads wait on each other at every op's barrier whenever another process
    # holds a core, which slows small ops by an order of magnitude at random; one thread times both
    # methods alike (the ratios are what the study reports).
    with intra_op_threads(1) if device.type == "cpu" else contextlib.nullcontext():
        for fn in fns.values():
            time_call(fn, repeats=1, device=device, warmup=warmup)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(time_call(fn, repeats=1, device=device, warmup=0))
    return {name: min(t) for name, t in times.items()}


def measure(settings: RunSettings, vlm, ks: list[int]) -> list[dict]:
    """One row per K: counted FLOPs and their ratios, and wall times and their ratios."""
    task: OverheadSettings = settings.task
    device = next(vlm.model.parameters()).device
    image_head, text_head = vlm.image_head, vlm.text_head
    dim, p, q = image_head.weight.shape[0], image_head.weight.shape[1], text_head.weight.shape[1]
    biases = {"image_bias": image_head.bias is not None, "text_bias": text_head.bias is not None}
    encoders = encoder_flops(vlm)
    size = vlm.model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    pixels = torch.rand(task.batch, 3, h, w, generator=torch.Generator().manual_seed(settings.seed)).to(
        device
    )
    bias = vlm.logit_bias
    rows = []
    for k in ks:
        costs = predictive_costs(task.batch, k, dim, p, q, **biases, logit_bias=bias, device=device)
        more = predictive_costs(2 * task.batch, k, dim, p, q, **biases, logit_bias=bias, device=device)
        pipeline = overhead_summary(encoders, costs)  # N images and K prompts encoded
        cached_prompts = overhead_summary({"image": encoders["image"], "text": 0}, costs)
        synthetic = synthetic_kfac_inputs(
            task.batch, k, dim, p, q, **biases, seed=settings.seed, device=device
        )
        text, posts, features = synthetic["text"], synthetic["posts"], synthetic["image"]
        times = timings(vlm, pixels, features, text, posts, task.repeats, task.warmup)
        rows.append(
            {
                "model": settings.model.name,
                "device": device.type,
                "batch": task.batch,
                "classes": k,
                "image_encoder_gflops": encoders["image"] / 1e9,
                "text_encoder_gflops": encoders["text"] / 1e9,
                "map_predictive_gflops": costs["map"].matmul_flops / 1e9,
                "bayesvlm_predictive_gflops": costs["bayesvlm"].matmul_flops / 1e9,
                "bayesvlm_extra_elementwise_gops": pipeline["extra_elementwise_ops"] / 1e9,
                # Per additional image: the K prompts' encoding and variances paid once (a long evaluation).
                "flops_overhead": per_image_overhead(encoders["image"], costs, more),
                # Per batch of N images against K cached prompt embeddings; BayesVLM recomputes the K
                # prompts' variances per call, counted here.
                "flops_overhead_batch": cached_prompts["flops_overhead"],
                "flops_overhead_batch_with_elementwise": cached_prompts["flops_overhead_with_elementwise"],
                # The same with the K prompts encoded in the pipeline too.
                "flops_overhead_batch_with_prompts": pipeline["flops_overhead"],
                "map_pixels_s": times["map_pixels"],
                "bayesvlm_pixels_s": times["bayesvlm_pixels"],
                # The pixel paths share the encoder and differ by the predictive alone: the difference of
                # the cached-feature times is the same extra time, measured with far less noise. It
                # includes the K prompts' variances, which BayesVLM computes per call (an upper bound for
                # a long evaluation, where they are computed once).
                "runtime_overhead": (times["bayesvlm_features"] - times["map_features"])
                / times["map_pixels"],
                "runtime_overhead_direct": times["bayesvlm_pixels"] / times["map_pixels"] - 1.0,
                "map_features_s": times["map_features"],
                "bayesvlm_features_s": times["bayesvlm_features"],
                "features_time_ratio": times["bayesvlm_features"] / times["map_features"],
            }
        )
    return rows


def write_summary(directory: Path, title: str) -> pd.DataFrame:
    """Every model's table in ``directory`` as one table (CSV/MD/LaTeX) and its figure."""
    frames = [pd.read_csv(p) for p in sorted(directory.glob("*.csv")) if p.stem != SUMMARY]
    summary = pd.concat(frames, ignore_index=True)
    with atomic_write(directory / f"{SUMMARY}.csv", "w") as f:
        summary.to_csv(f, index=False, float_format="%.6g")
    with atomic_write(directory / f"{SUMMARY}.md", "w") as f:
        f.write(f"**{title}**\n\n" + summary.to_markdown(index=False, floatfmt=".4g") + "\n")
    with atomic_write(directory / f"{SUMMARY}.tex", "w") as f:
        f.write(summary.to_latex(index=False, float_format="%.4g", caption=title, na_rep="--"))
    plot_overhead(
        summary.to_dict("records"),
        directory / f"{SUMMARY}.png",
        bounds=(OVERHEAD_FLOPS_BOUND, OVERHEAD_RUNTIME_BOUND),
        title=title,
    )
    return summary


def run(settings: RunSettings) -> TaskResult:
    dirs = prepare_dirs(settings.paths)
    ks = class_counts(settings)
    model = load_model(settings, dirs)
    rows = measure(settings, model.vlm, ks)
    table = pd.DataFrame(rows)
    directory, stem = output_location(settings)
    worst = table.loc[table["runtime_overhead"].idxmax()]
    console.print(
        f"{settings.model.name}: FLOPs +{100 * table['flops_overhead'].max():.4f}%, wall time from pixels "
        f"+{100 * worst['runtime_overhead']:.1f}% (K={int(worst['classes'])}, {worst['device']})"
    )
    provenance = {
        "model": model.identity,
        "columns": (
            "gflops: matmul FLOPs (torch.utils.flop_counter; 2*m*n*k) per input for the encoders, per batch "
            "for the predictives; flops_overhead: extra matmul FLOPs of BayesVLM over MAP per additional "
            "image (the K prompts' costs paid once), as a fraction of MAP's; flops_overhead_batch: the same "
            "for one batch of N images against K cached prompt embeddings (with_prompts: the K prompts "
            "encoded too; with_elementwise: plus the predictive's extra elementwise ops, an upper bound); "
            "*_s: fastest wall seconds of task.repeats rounds; runtime_overhead: the extra time of the BayesVLM "
            "predictive (cached features, BayesVLM - MAP) over MAP's time from pixels; runtime_overhead_direct: "
            "BayesVLM / MAP - 1 from pixels (the same in expectation, noisier: it differences two encoder runs); "
            "features_time_ratio: BayesVLM / MAP on cached features"
        ),
        "timing_threads": 1 if resolve_device(settings.device).type == "cpu" else torch.get_num_threads(),
    }
    paths = write_study(
        table,
        directory,
        stem,
        title=f"overhead / {settings.model.name}",
        settings=settings,
        provenance=provenance,
    )
    write_summary(directory, f"BayesVLM overhead over MAP ({directory.name})")
    return TaskResult(table, None, paths["record"])
