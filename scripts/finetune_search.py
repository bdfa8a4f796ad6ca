"""Choose active learning's fine-tuning learning rate and epochs on the target domain's validation split.

    python scripts/finetune_search.py experiment=offline_active_learning [--lrs 1e-5 1e-4 ...]
        [--epochs 10 20 30 50 100] [--seeds 0 1 2] [--tol 0.01]

Any other arguments are `uqvlm run` overrides: the search runs on the pool, target and settings that
run would use (task.budgets, task.finetune's weight decay, batch size and epoch selection). For every
learning rate, budget and seed, the pool points the `random` strategy picks for that seed are labelled and
the image last layer is fine-tuned for the largest epoch count, exactly as the study fine-tunes them (same
shuffles), recording the validation loss of every epoch. A run of E epochs is that run's prefix (AdamW has
no schedule and epoch e's shuffle does not depend on E), so its kept validation loss is the minimum over
epochs 1..E (0..E with task.finetune.include_pretrained). Only random selections are used: the choice
favours no strategy, and the target's test split is never read.

Choice: the learning rate with the lowest mean validation NLL (over budgets and seeds) at the largest epoch
count; then the fewest epochs whose mean is within --tol nats of it. Writes
<results>/active_learning/<data>-<target>/finetune_search.{csv,md,json} (the study's summary says whether
its settings are this choice).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import pandas as pd
import torch

from uqvlm.active.strategies import select
from uqvlm.cache import atomic_write
from uqvlm.tasks.active_learning import SEARCH_STEM, dataset_slug, prepare
from uqvlm.tasks.common import load_settings, prepare_dirs


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("uqvlm.configs", version_base="1.3"):
        return hydra_compose("config", overrides=["task=active_learning", *overrides])


def choose(table: pd.DataFrame, tol: float) -> tuple[float, int]:
    """(lr, epochs) from the per-(lr, epochs) mean validation NLL, by the rule in the module docstring."""
    means = table.groupby(["lr", "epochs"])["val_nll"].mean()
    longest = means.xs(table.epochs.max(), level="epochs")
    lr = float(longest.idxmin())
    by_epochs = means.xs(lr, level="lr")
    epochs = int(min(e for e, v in by_epochs.items() if v <= longest[lr] + tol))
    return lr, epochs


def _markdown(frame: pd.DataFrame) -> str:
    # Formatted here: tabulate would read the learning rates (the index) as numbers and print 1e-05 as 0.0000.
    return frame.map(lambda v: f"{v:.4f}").to_markdown(disable_numparse=True)


def markdown(table: pd.DataFrame, lr: float, epochs: int, args, settings, pool: int, val: int) -> str:
    ft = settings.task.finetune
    named = table.assign(lr=table.lr.map(lambda v: f"{v:g}"))  # 1e-05, not 0.0000
    grid = named.pivot_table(index="lr", columns="epochs", values="val_nll", aggfunc="mean", sort=False)
    per_budget = named[named.epochs == epochs].pivot_table(
        index="lr", columns="budget", values="val_nll", aggfunc="mean", sort=False
    )
    zero = float(table.val_nll_pretrained.mean())
    first = "0" if ft.include_pretrained else "1"
    return "\n".join(
        [
            f"# Fine-tuning search: {dataset_slug(settings.task.data)} / {settings.model.name}",
            "",
            f"Pool {pool} images, target validation split {val} images. For every learning rate, budget "
            f"({', '.join(map(str, settings.task.budgets))}) and seed ({', '.join(map(str, args.seeds))}): the "
            f"`random` strategy's picks, AdamW (weight decay {ft.weight_decay:g}, batch {ft.batch_size}), "
            f"{max(args.epochs)} epochs; a run of E epochs keeps the epoch {first}..E with the lowest "
            "validation loss (MAP cross-entropy = NLL on the target's validation split).",
            "",
            f"Rule: the learning rate with the lowest mean validation NLL at {max(args.epochs)} epochs, then "
            f"the fewest epochs within {args.tol:g} nats of it. **Chosen: lr {lr:g}, {epochs} epochs.** "
            f"(The pre-trained layer's validation NLL: {zero:.4f}.)",
            "",
            "Mean validation NLL over budgets and seeds (rows: lr, columns: epochs):",
            "",
            _markdown(grid),
            "",
            f"At {epochs} epochs, per budget (rows: lr, columns: budget):",
            "",
            _markdown(per_budget),
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    ap.add_argument("--epochs", type=int, nargs="+", default=[10, 20, 30, 50, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tol", type=float, default=0.01, help="nats of mean validation NLL")
    args, overrides = ap.parse_known_args()
    settings = load_settings(compose(overrides))
    task = settings.task
    dirs = prepare_dirs(settings.paths)
    study = prepare(settings, dirs)
    acq = task.acquisition()
    budgets, longest = task.budgets, max(args.epochs)
    first = 0 if task.finetune.include_pretrained else 1

    rows = []
    start = time.perf_counter()
    torch.set_num_threads(1)  # tiny ops: see uqvlm.active.finetune
    for seed in args.seeds:
        picks = select(study.problem, "random", budgets[-1], seed, acq).indices
        for lr in args.lrs:
            cfg = dataclasses.replace(task.finetune, lr=lr, epochs=longest)
            for budget in budgets:
                result = study.finetune(picks[:budget], cfg, seed, "random")
                losses = result.val_losses
                for epochs in args.epochs:
                    kept = min(range(first, epochs + 1), key=lambda e: (losses[e], e))
                    rows.append(
                        {
                            "lr": lr,
                            "epochs": epochs,
                            "budget": budget,
                            "seed": seed,
                            "val_nll": losses[kept],
                            "best_epoch": kept,
                            "val_nll_pretrained": losses[0],
                        }
                    )
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    table = pd.DataFrame(rows)
    lr, epochs = choose(table, args.tol)
    out = dirs.results / "active_learning" / dataset_slug(task.data)
    with atomic_write(out / f"{SEARCH_STEM}.csv", "w") as f:
        table.to_csv(f, index=False, float_format="%.6f")
    text = markdown(table, lr, epochs, args, settings, len(study.data.pool), len(study.data.val_labels))
    with atomic_write(out / f"{SEARCH_STEM}.md", "w") as f:
        f.write(text)
    choice = {
        "lr": lr,
        "epochs": epochs,
        "rule": f"lowest mean validation NLL at {longest} epochs, then the fewest epochs within {args.tol:g}",
        "lrs": args.lrs,
        "epochs_grid": args.epochs,
        "budgets": list(budgets),
        "seeds": args.seeds,
    }
    with atomic_write(out / f"{SEARCH_STEM}.json", "w") as f:
        json.dump(choice, f, indent=2)
    print(text)
    print(f"chosen: task.finetune.lr={lr:g} task.finetune.epochs={epochs}  ({out / SEARCH_STEM}.md)")


if __name__ == "__main__":
    main()
