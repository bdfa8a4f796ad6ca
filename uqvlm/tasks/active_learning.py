"""``task=active_learning``: strategies x budgets x seeds on cached features (paper section 4.2).

Per (strategy, seed) one selection of the largest budget is made (smaller budgets are its prefixes), the
image last layer is fine-tuned on each prefix, and the MAP and BayesVLM predictives (posterior centred at
the fine-tuned weights, same covariance) are scored on the target test split. Every job writes its rows
under ``<model>.rows/<setup>/`` and re-aggregates all rows of the same setup into the table, so a Hydra
multirun over strategies, budgets or seeds fills one table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from uqvlm.active.curves import LEVEL, ZERO_SHOT, comparison_lines
from uqvlm.active.curves import aggregate as aggregate_rows
from uqvlm.active.domains import DomainData, build_domain_data
from uqvlm.active.finetune import FinetuneConfig, FinetuneResult, embed, finetune_image_layer
from uqvlm.active.strategies import STRATEGIES, TARGETED_STRATEGIES, ActiveProblem, make_generator, select
from uqvlm.cache import atomic_write, cache_key
from uqvlm.console import console, progress
from uqvlm.errors import ConfigError, UqvlmError
from uqvlm.extraction import encode_prompts
from uqvlm.features import Features, LastLayer
from uqvlm.methods import BayesVLM, ZeroShotContext, cosine_logits
from uqvlm.metrics import evaluate_log_probs
from uqvlm.results import model_slug, write_results
from uqvlm.settings import ActiveDataSettings, ActiveLearningSettings, RunSettings
from uqvlm.tasks.common import LoadedModel, RunDirs, TaskResult, extract_features, load_model, prepare_dirs
from uqvlm.tasks.hessian import ensure_hessian_data, fit_posteriors

ROW_COLUMNS = [
    "strategy",
    "budget",
    "seed",
    "acc",
    "nll",
    "ece",
    "map_acc",
    "map_nll",
    "map_ece",
    "best_epoch",
    "select_s",
    "finished",
]
# The fine-tuning search's output (scripts/finetune_search.py) next to the table, when there is one.
SEARCH_STEM = "finetune_search"


def _slug(text: str) -> str:
    return "-".join(str(text).lower().replace("_", " ").split())


def dataset_slug(data: ActiveDataSettings) -> str:
    """``<data>-<target>``, lower case, spaces as dashes, when the target's train split is in the pool (as
    in the published protocols); ``<data>-<target>-pool-without-target`` when it is not."""
    base = f"{_slug(data.name)}-{_slug(data.target)}"
    return base + ("" if data.include_target_in_pool else "-pool-without-target")


def _load_data(task: ActiveLearningSettings, model: LoadedModel, dirs: RunDirs) -> DomainData:
    def extractor(ds, what: str) -> tuple[Features, torch.Tensor]:
        feats = extract_features(model, dirs, ds, what)
        return feats["image"], feats["targets"]

    return build_domain_data(task.data.section, extractor)


def check_budgets(task: ActiveLearningSettings, data: DomainData) -> None:
    """The largest budget fits the pool, and the pool points the targeted strategies can reach."""
    budget = task.budgets[-1]
    if budget > len(data.pool):
        raise UqvlmError(f"budget {budget} exceeds the pool of {len(data.pool)} images")
    targets = data.target_labels.numel()
    targeted = [
        s
        for s in task.strategies
        if s in TARGETED_STRATEGIES and not (s == "epig" and task.epig.candidates == "pool")
    ]
    if targeted and budget > task.k_nearest * targets:
        raise ConfigError(
            f"budget {budget} exceeds the {task.k_nearest * targets} pool points that {', '.join(targeted)} "
            f"can reach (task.k_nearest={task.k_nearest} per each of {targets} target points): raise "
            "task.k_nearest or lower task.budgets"
        )


class Evaluator:
    """Test metrics of a last layer: MAP and BayesVLM predictives on the target test split."""

    def __init__(self, settings: RunSettings, data: DomainData, text: Features, vlm, posts: dict[str, Any]):
        task = settings.task
        self.data, self.text, self.posts = data, text, posts
        self.scale, self.bias = vlm.logit_scale, vlm.logit_bias
        self.ece_bins = task.ece_bins
        self.method = BayesVLM(
            structure=task.structure, predictive=task.predictive, samples=task.mc_samples, seed=settings.seed
        )
        self.ctx = ZeroShotContext(
            logit_scale=self.scale,
            logit_bias=self.bias,
            image=data.target,
            labels=data.target_labels,
            text=text,
            posterior=settings.posterior,
            validation_provider=lambda: (data.val, data.val_labels),
            views_provider=self._no_views,
            posterior_provider=lambda _structure: posts,
        )
        # n and lambda on both towers, as in zero-shot (the evidence by default).
        self.method.configure_prior(self.ctx, posts)

    @staticmethod
    def _no_views(_k: int) -> list[Features]:
        raise UqvlmError("active learning has no augmented views")

    def __call__(self, layer: LastLayer) -> dict[str, float]:
        feats = self.data.target
        z = embed(layer, feats)  # residuals included
        map_log_probs = cosine_logits(z, self.text.embeddings, self.scale, self.bias).log_softmax(-1)
        bayes_log_probs = self.method.log_probs(self.ctx, Features(feats.activations, z), self.posts)
        bayes = evaluate_log_probs(bayes_log_probs, self.data.target_labels, self.ece_bins)
        map_ = evaluate_log_probs(map_log_probs, self.data.target_labels, self.ece_bins)
        return {
            "acc": bayes["acc"],
            "nll": bayes["nll"],
            "ece": bayes["ece"],
            "map_acc": map_["acc"],
            "map_nll": map_["nll"],
            "map_ece": map_["ece"],
        }


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """Seeds, mean and 95% t-interval per (strategy, budget), in STRATEGIES order (uqvlm.active.curves)."""
    return aggregate_rows(rows, STRATEGIES)


def read_rows(directory: Path) -> pd.DataFrame:
    """Every job's rows of one setup; a (strategy, budget, seed) run twice keeps its latest row."""
    frames = [pd.read_csv(p) for p in sorted(directory.glob("*.csv"))]
    if not frames:
        return pd.DataFrame(columns=ROW_COLUMNS)
    rows = pd.concat(frames, ignore_index=True).sort_values("finished", kind="stable")
    return rows.drop_duplicates(["strategy", "budget", "seed"], keep="last").reset_index(drop=True)


def plot_curves(table: pd.DataFrame, path: Path, title: str) -> None:
    """Accuracy and NLL (BayesVLM predictive) against the budget per strategy, each with its 95% interval
    over seeds as a band (the style of the paper's Fig. 4); zero-shot as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    axes = dict(zip(("acc", "nll"), fig.subplots(1, 2), strict=True))
    curves = table[table.strategy != ZERO_SHOT]
    for strategy, g in curves.groupby("strategy", sort=False):
        g = g.sort_values("budget")
        color = None
        for metric, ax in axes.items():
            line = ax.plot(g.budget, g[f"{metric}_mean"], marker="o", color=color, label=strategy)[0]
            color = line.get_color()
            ax.fill_between(g.budget, g[f"{metric}_lo"], g[f"{metric}_hi"], color=color, alpha=0.15, lw=0)
    zs = table[table.strategy == ZERO_SHOT]
    for metric, ax in axes.items():
        if len(zs):
            ax.axhline(float(zs[f"{metric}_mean"].iloc[0]), color="grey", ls="--", label=ZERO_SHOT)
        ax.set_xscale("log")
        ax.set_xticks(sorted(curves.budget.unique()))
        ax.set_xticklabels([str(b) for b in sorted(curves.budget.unique())])
        ax.set_xlabel("labelled budget")
        ax.set_ylabel(f"test {'accuracy' if metric == 'acc' else 'NLL'} (BayesVLM)")
        ax.grid(alpha=0.3)
    axes["acc"].legend(fontsize=8)
    fig.suptitle(f"{title} (bands: {LEVEL:.0%} t-interval over seeds)")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def search_note(finetune: FinetuneConfig, search: dict[str, Any] | None) -> str:
    """How the fine-tuning settings relate to the fine-tuning search next to the table (if any)."""
    if search is None:
        return "."
    if (search["lr"], search["epochs"]) == (finetune.lr, finetune.epochs):
        return f"; chosen on the target's validation split, see `{SEARCH_STEM}.md`."
    return f"; not the choice of `{SEARCH_STEM}.md` (lr {search['lr']:g}, {search['epochs']} epochs)."


def summary_markdown(
    table: pd.DataFrame, title: str, finetune: FinetuneConfig, search: dict[str, Any] | None
) -> str:
    """The learning curves in plain words: which strategies beat random beyond the intervals, where."""
    seeds = sorted(set(table.loc[table.strategy != ZERO_SHOT, "seeds"]))
    zs = table[table.strategy == ZERO_SHOT]
    lines = [
        f"# {title}",
        "",
        f"Mean over seeds ({', '.join(map(str, seeds))} per strategy and budget) with a {LEVEL:.0%} Student-t "
        "interval; test split of the target domain, BayesVLM predictive (the `map_*` columns of the table: "
        "MAP predictive).",
        "",
        f"Fine-tuning (`task.finetune`): AdamW lr {finetune.lr:g}, weight decay {finetune.weight_decay:g}, "
        f"{finetune.epochs} epochs, batch {finetune.batch_size}, the epoch with the lowest validation loss "
        f"kept among {'0' if finetune.include_pretrained else '1'}..{finetune.epochs}"
        + search_note(finetune, search),
        "",
    ]
    if len(zs):
        lines += [f"Zero-shot: accuracy {zs.acc_mean.iloc[0]:.4f}, NLL {zs.nll_mean.iloc[0]:.4f}.", ""]
    lines += ["A strategy beats random at a budget when its interval lies entirely beyond random's:", ""]
    lines += comparison_lines(table, "acc", "accuracy")
    lines += comparison_lines(table, "nll", "NLL")
    return "\n".join(lines) + "\n"


def _subset(feats: Features, idx: torch.Tensor) -> Features:
    return Features(
        feats.activations[idx],
        feats.embeddings[idx],
        None if feats.residuals is None else feats.residuals[idx],
    )


def _setup_key(
    settings: RunSettings, model: LoadedModel, data: DomainData, posts: dict[str, Any], post_ident: dict
) -> str:
    """Everything that determines a row except the loop lists (strategies, budgets, seeds)."""
    config = settings.config
    return cache_key(
        model=model.identity,
        data=data.fingerprint,
        posterior=post_ident,
        prior={t: (p.n, p.prior_precision) for t, p in posts.items()},
        posterior_settings=config["posterior"],
        task={k: v for k, v in config["task"].items() if k not in ("strategies", "budgets", "seeds")},
    )


def finished_record(settings: RunSettings) -> Path | None:
    """None: every job adds its rows to its setup's table, so none is skipped."""
    return None


@dataclass
class Study:
    """What every job of one setup shares: the model, the pool and target data, the class text features,
    the fitted posteriors (with their cache identity) and the acquisition problem built from them."""

    model: LoadedModel
    data: DomainData
    text: Features
    posts: dict[str, Any]
    post_ident: dict[str, Any]
    problem: ActiveProblem

    @property
    def map_layer(self) -> LastLayer:
        """The pre-trained image last layer (the posteriors' mean)."""
        return self.posts["image"].last_layer

    def finetune(self, indices: Tensor, cfg: FinetuneConfig, seed: int, strategy: str) -> FinetuneResult:
        """The pre-trained layer fine-tuned on the pool points ``indices`` (shuffles seeded by the seed,
        the strategy and the budget), epochs selected on the target's validation split."""
        data, vlm = self.data, self.model.vlm
        return finetune_image_layer(
            self.map_layer,
            _subset(data.pool, indices),
            data.pool_labels[indices],
            data.val,
            data.val_labels,
            self.text.embeddings,
            vlm.logit_scale,
            vlm.logit_bias,
            cfg,
            make_generator(seed, "finetune", strategy, str(len(indices))),
        )


def prepare(settings: RunSettings, dirs: RunDirs) -> Study:
    """Load (from the caches, or compute) everything a job needs before it selects and fine-tunes."""
    task = settings.task
    model = load_model(settings, dirs)
    ensure_hessian_data(settings, model, dirs)
    vlm = model.vlm
    data = _load_data(task, model, dirs)
    check_budgets(task, data)
    prompts = [[t.format(c=c) for t in data.templates] for c in data.classnames]
    text = encode_prompts(
        vlm,
        prompts,
        cache_dir=dirs.cache,
        model_id=model.identity,
        precision=model.precision,
    )
    posts, post_ident = fit_posteriors(settings.hessian_data, model, dirs, task.structure)
    problem = ActiveProblem(
        data.pool, data.target, text, vlm.logit_scale, vlm.logit_bias, posts["image"], posts["text"]
    )
    return Study(model, data, text, posts, post_ident, problem)


def run(settings: RunSettings) -> TaskResult:
    task = settings.task
    dirs = prepare_dirs(settings.paths)
    strategies, budgets, seeds = task.strategies, task.budgets, task.seeds
    acq, ft_cfg = task.acquisition(), task.finetune
    study = prepare(settings, dirs)
    model, data, text, posts, post_ident = study.model, study.data, study.text, study.posts, study.post_ident
    vlm = model.vlm
    evaluate = Evaluator(settings, data, text, vlm, posts)  # sets n and the prior precision first
    problem, map_layer = study.problem, study.map_layer
    console.print(
        f"pool {len(data.pool)} ({', '.join(data.pool_domains)}), target {data.target_labels.numel()} test / "
        f"{data.val_labels.numel()} val, {len(data.classnames)} classes; prior precision "
        f"{posts['image'].prior_precision:.3g} (image) / {posts['text'].prior_precision:.3g} (text), "
        f"n={posts['image'].n:g}"
    )

    row0 = {"strategy": ZERO_SHOT, "budget": 0, "seed": -1, **evaluate(map_layer), "best_epoch": 0}
    rows = [{**row0, "select_s": 0.0, "finished": time.time()}]
    selections: dict[str, dict[str, list[int]]] = {}
    with progress() as bar:
        bar_task = bar.add_task("active learning", total=len(strategies) * len(seeds) * (1 + len(budgets)))
        for strategy in strategies:
            for seed in seeds:
                bar.update(bar_task, description=f"{strategy} seed {seed}: selecting")
                start = time.perf_counter()
                sel = select(problem, strategy, budgets[-1], seed, acq)
                select_s = time.perf_counter() - start
                selections.setdefault(strategy, {})[str(seed)] = sel.indices.tolist()
                bar.advance(bar_task)
                for budget in budgets:
                    bar.update(bar_task, description=f"{strategy} seed {seed}: fine-tuning on {budget}")
                    result = study.finetune(sel.indices[:budget], ft_cfg, seed, strategy)
                    row = {"strategy": strategy, "budget": budget, "seed": seed, **evaluate(result.layer)}
                    rows.append(
                        {
                            **row,
                            "best_epoch": result.best_epoch,
                            "select_s": select_s,
                            "finished": time.time(),
                        }
                    )
                    bar.advance(bar_task)

    out_dir = dirs.results / "active_learning" / dataset_slug(task.data)
    stem = model_slug(settings.model)
    rows_dir = out_dir / f"{stem}.rows" / _setup_key(settings, model, data, posts, post_ident)
    job = cache_key(strategies=strategies, budgets=budgets, seeds=seeds)[:12]
    with atomic_write(rows_dir / f"{job}.csv", "w") as f:
        pd.DataFrame(rows, columns=ROW_COLUMNS).to_csv(f, index=False, float_format="%.6f")
    with atomic_write(rows_dir / f"{job}.selections.json", "w") as f:
        json.dump(
            {
                "pool_domains": data.pool_domains,
                "pool_domain": data.pool_domain.tolist(),
                "selections": selections,
            },
            f,
        )

    table = aggregate(read_rows(rows_dir))
    title = f"active learning {dataset_slug(task.data)} / {settings.model.name}"
    search_path = out_dir / f"{SEARCH_STEM}.json"
    search = json.loads(search_path.read_text()) if search_path.exists() else None
    provenance = {
        "job_rows": str(rows_dir),
        "posterior": post_ident,
        "model": model.identity,
        "columns": (
            "acc/nll/ece: BayesVLM predictive; map_*: MAP predictive; <metric>_mean over seeds, "
            f"<metric>_lo/_hi: {LEVEL:.0%} Student-t interval for the mean"
        ),
        "finetune_search": search,
    }
    paths = write_results(table, out_dir, stem, title=title, config=settings.config, provenance=provenance)
    plot_curves(table, out_dir / f"{stem}.png", title)
    summary = summary_markdown(table, title, task.finetune, search)
    with atomic_write(out_dir / f"{stem}.summary.md", "w") as f:
        f.write(summary)
    console.print(summary)
    console.print(f"learning curves: {out_dir / f'{stem}.png'}")
    return TaskResult(table, None, paths["record"])
