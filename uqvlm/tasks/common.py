"""What every task needs: the checked output directories, the model, and its cache identity."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from uqvlm.cache import file_digest
from uqvlm.errors import UqvlmError
from uqvlm.paths import ensure_writable


@dataclass
class RunDirs:
    cache: Path
    results: Path


def prepare_dirs(cfg: DictConfig) -> RunDirs:
    """Check, before any compute, the config and that the cache and results directories are writable."""
    validate_config(cfg)
    return RunDirs(
        cache=ensure_writable(cfg.paths.cache_dir, "cache"),
        results=ensure_writable(cfg.paths.results_dir, "results"),
    )


def validate_config(cfg: DictConfig) -> None:
    """Reject bad or incompatible settings before any compute, naming the config key."""
    from uqvlm.laplace.evidence import EVIDENCE_VARIANTS
    from uqvlm.models import check_model_name
    from uqvlm.tasks.keys import check_config_keys

    check_config_keys(cfg)
    name = cfg.model.name
    if not str(name).startswith(("hf-hub:", "local-dir:")):
        check_model_name(name)
    if cfg.model.get("pretrained") == "shapes" and name != "uqvlm-tiny":
        raise UqvlmError(
            f"model.pretrained=shapes is uqvlm's own checkpoint for uqvlm-tiny, not for {name!r}"
        )
    post = cfg.posterior
    n = post.n
    if isinstance(n, bool) or not isinstance(n, int | float) or not n > 0 or n != n:
        raise UqvlmError(f"posterior.n must be a positive number (the pseudo-data count), got {n!r}")
    lam = post.prior_precision
    if isinstance(lam, str):
        if lam not in ("evidence", "grid"):
            raise UqvlmError(
                f"posterior.prior_precision must be a positive number, 'evidence' or 'grid'; got {lam!r}"
            )
    elif isinstance(lam, bool) or not isinstance(lam, int | float) or not lam > 0 or lam == float("inf"):
        raise UqvlmError(f"posterior.prior_precision must be a positive finite number, got {lam!r}")
    if post.predictive not in ("probit", "mc"):
        raise UqvlmError(f"posterior.predictive must be 'probit' or 'mc', got {post.predictive!r}")
    if post.evidence_variant not in EVIDENCE_VARIANTS:
        raise UqvlmError(
            f"posterior.evidence_variant must be one of {', '.join(EVIDENCE_VARIANTS)}, "
            f"got {post.evidence_variant!r}"
        )
    objective = cfg.task.get("objective")
    if objective not in (None, "val_nll"):
        raise UqvlmError(f"task.objective must be null or val_nll, got {objective!r}")
    unknown = set(post.structures) - {"kfac", "diag"}
    if unknown:
        raise UqvlmError(f"posterior.structures may hold kfac and diag, got {sorted(unknown)}")
    if cfg.hessian_data.kind == "published" and "diag" in post.structures:
        raise UqvlmError(
            "hessian_data=published provides KFAC factors only: use posterior=kfac, or Hessian data "
            "(e.g. hessian_data=laion400m) for a diagonal posterior"
        )
    if lam == "evidence" and post.evidence_variant != "exact" and "diag" in evidence_structures(cfg):
        diag_from, kfac_only = (
            ("task.structure=diag", "task.structure=kfac")
            if cfg.task.name == "active_learning"
            else ("posterior.structures includes diag", "posterior=kfac")
        )
        raise UqvlmError(
            f"posterior.evidence_variant={post.evidence_variant} (the published code's evidence) exists for "
            f"KFAC only, but {diag_from}, whose evidence is exact only: use {kfac_only} with it, or "
            "posterior.evidence_variant=exact"
        )


def evidence_structures(cfg: DictConfig) -> set[str]:
    """The posterior structures whose prior precision the task sets (by the evidence, by default)."""
    task = cfg.task.get("name")
    if task == "active_learning":
        return {str(cfg.task.structure)}
    if task == "zeroshot":
        return {str(s) for s in cfg.posterior.structures}
    return set()  # task=hessian builds the posteriors only


def resolve_pretrained(model_cfg: DictConfig, cache_dir: Path) -> str | None:
    """The ``pretrained`` argument for open_clip; ``shapes`` means uqvlm's own cached tiny model."""
    pretrained = model_cfg.get("pretrained")
    if pretrained == "shapes":
        from uqvlm.models.pretrained import ensure_pretrained

        return str(ensure_pretrained(cache_dir, **(model_cfg.get("pretrain") or {})))
    return None if pretrained in (None, "", "none") else str(pretrained)


def model_identity(name: str, pretrained: str | None, precision: str) -> dict[str, Any]:
    """What determines a model's outputs: name, checkpoint (by content when it is a file), precision."""
    if pretrained and os.path.isfile(pretrained):
        weights = f"sha256:{file_digest(pretrained)}"
    else:
        weights = pretrained or "random-init"
    return {"name": name, "weights": weights, "precision": precision}


@dataclass
class LoadedModel:
    vlm: Any
    identity: dict[str, Any]
    precision: str
    batch_size: int


def load_model(cfg: DictConfig, dirs: RunDirs) -> LoadedModel:
    from uqvlm.models import load_vlm

    pretrained = resolve_pretrained(cfg.model, dirs.cache)
    precision = cfg.model.get("precision", "fp32")
    vlm = load_vlm(cfg.model.name, pretrained, device=cfg.device, precision=precision)
    return LoadedModel(
        vlm,
        model_identity(cfg.model.name, pretrained, precision),
        precision,
        int(cfg.model.get("batch_size", 256)),
    )


def extract_features(
    cfg: DictConfig, model: LoadedModel, dirs: RunDirs, dataset, description: str
) -> dict[str, Any]:
    """Cached features of ``dataset`` under this run's model, device and loader settings."""
    from uqvlm.extraction import extract

    return extract(
        model.vlm,
        dataset,
        cache_dir=dirs.cache,
        model_id=model.identity,
        dataset_id=dataset.fingerprint(),
        batch_size=model.batch_size,
        num_workers=int(cfg.num_workers),
        device=cfg.device,
        precision=model.precision,
        description=description,
    )
