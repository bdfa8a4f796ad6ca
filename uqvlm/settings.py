"""Typed settings: each config group becomes one checked object where a task starts.

``RunSettings.from_config`` turns the composed Hydra config into these dataclasses once; the code below
the tasks receives them, never a DictConfig. A field is a key its section may hold
(``uqvlm.tasks.keys`` derives the allowed keys from the fields), and each class checks its values in
``__post_init__``, raising :class:`~uqvlm.errors.ConfigError` with the config key. Defaults live in the
YAML files under ``configs/``; a field has a default here only where its key is optional there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Literal, TypeVar, get_args, get_type_hints

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from uqvlm.active.acquisition import DISTANCES
from uqvlm.active.domains import align_mode, pool_domains, split_mode
from uqvlm.active.finetune import FinetuneConfig
from uqvlm.active.strategies import EPIG_CANDIDATES, STRATEGIES, TARGETED_STRATEGIES, AcquisitionConfig
from uqvlm.config_utils import require_set
from uqvlm.data.sections import (
    WHOLE_SECTION,
    DatasetSettings,
    HessianDataSettings,
    PairDataSettings,
    PublishedFactorsSettings,
    hessian_data_settings,
    plain_section,
)
from uqvlm.errors import ConfigError, UqvlmError
from uqvlm.laplace import STRUCTURES, DiagPosterior, KFACPosterior, MAPPosterior
from uqvlm.laplace.evidence import EVIDENCE_VARIANTS
from uqvlm.methods import PREDICTIVES, PRIOR_PRECISION_MODES, Method, Predictive, PriorPrecisionMode
from uqvlm.validation import check_choice, check_positive, check_positive_int

__all__ = [
    "FITTED_STRUCTURES",
    "TARGETED_STRATEGIES",
    "TASK_SETTINGS",
    "ActiveDataSettings",
    "ActiveLearningSettings",
    "CorruptionSettings",
    "DatasetSettings",
    "EpigSettings",
    "HessianDataSettings",
    "HessianSizeSettings",
    "HessianTaskSettings",
    "ModelSettings",
    "OverheadSettings",
    "PathSettings",
    "PosteriorSettings",
    "PriorGridSettings",
    "ProbCosineStudySettings",
    "ProxyDataSettings",
    "RunSettings",
    "Schema",
    "TaskSettings",
    "UncertaintyErrorSettings",
    "ZeroShotSettings",
    "build",
]

T = TypeVar("T")

# Posterior structures with a curvature to estimate from Hessian data (every registered one but MAP).
FITTED_STRUCTURES = tuple(s for s, cls in STRUCTURES.items() if cls is not MAPPosterior)
# The Laplace evidence; the other variants reproduce published code (KFAC only).
EXACT_EVIDENCE = EVIDENCE_VARIANTS[0]
EPIG_DTYPES = {"float64": torch.float64, "float32": torch.float32}
# What ``task.objective`` may ask a zero-shot run to return to a sweeper (null: nothing).
Objective = Literal["val_nll"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)


class Schema(Enum):
    """Sections whose keys are not fields of a settings class (field metadata ``schema``)."""

    DATASET = "a dataset section: its kind's constructor arguments plus the tasks' keys"
    METHODS = "method name -> a _target_ spec: its constructor's arguments"
    DOMAINS = "domain name -> a dataset section merged over task.data.common"
    PAIR_DATA = "a hessian_data section: its kind's constructor arguments plus the tasks' keys"


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # __post_init__ of a frozen dataclass normalises its fields


def _names(path: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError(f"{path} must be a list, got {value!r}")
    return tuple(value)


def _int(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    return value


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    return value


def build(cls: type[T], path: str, values: Mapping[str, Any]) -> T:
    """``cls`` from the plain config section ``values`` at ``path``: each field from its key (a dataclass
    field from its sub-section), an absent optional key from the field's default. The key check
    (``uqvlm.tasks.keys``) has refused the keys no field takes."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path} must be a section of keys, got {values!r}")
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.metadata.get("whole_section"):
            kwargs[f.name] = dict(values)
            continue
        if f.name not in values:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{path}.{f.name} is not set")
            continue
        value = values[f.name]
        if is_dataclass(hints[f.name]) and isinstance(value, Mapping):
            value = build(hints[f.name], f"{path}.{f.name}", value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except UqvlmError:
        raise
    except ValueError as err:  # the check of a library dataclass (FinetuneConfig), which names no section
        raise ConfigError(f"{path}: {err}") from err


# ------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """The ``model`` group: an open_clip model, its weights and how it is run."""

    name: str
    # An open_clip tag, a checkpoint file, hf-hub:/local-dir:, or ``shapes`` (uqvlm's tiny checkpoint).
    pretrained: str | None = None
    precision: str = "fp32"
    # Images (and captions) per encoder batch; auto: the largest that fits on the GPU (256 on the CPU).
    batch_size: int | Literal["auto"] = 256
    # The tiny model's pretraining recipe (with ``pretrained: shapes``), e.g. {seed: 0}.
    pretrain: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Imported here: open_clip takes seconds to import, and the data layer imports these settings.
        from uqvlm.models.tiny import MODEL_NAME
        from uqvlm.models.vlm import PRECISIONS
        from uqvlm.models.weights import check_model_name

        name = str(self.name)
        _set(self, "name", name)
        if not name.startswith(("hf-hub:", "local-dir:")):
            check_model_name(name)
        if self.pretrained is not None:
            _set(self, "pretrained", str(self.pretrained))
        if self.pretrained == "shapes" and name != MODEL_NAME:
            raise ConfigError(
                f"model.pretrained=shapes is uqvlm's own checkpoint for {MODEL_NAME}, not for {name!r}"
            )
        check_choice("model.precision", self.precision, PRECISIONS, ConfigError)
        if self.batch_size != "auto":
            _set(self, "batch_size", check_positive_int("model.batch_size", self.batch_size, ConfigError))
        if not isinstance(self.pretrain or {}, Mapping):
            raise ConfigError(f"model.pretrain must be a section of keys, got {self.pretrain!r}")
        _set(self, "pretrain", dict(self.pretrain or {}))


@dataclass(frozen=True, kw_only=True)
class PosteriorSettings:
    """The ``posterior`` group: the structures of BayesVLM's posteriors and how their prior is set."""

    structures: tuple[str, ...]
    n: float  # the pseudo-data count (method.md section 4)
    prior_precision: float | PriorPrecisionMode
    evidence_variant: str

    def __post_init__(self) -> None:
        structures = _names("posterior.structures", self.structures)
        if unknown := sorted(set(structures) - set(FITTED_STRUCTURES)):
            raise ConfigError(
                f"posterior.structures may hold {' and '.join(FITTED_STRUCTURES)}, got {unknown}"
            )
        _set(self, "structures", structures)
        _set(self, "n", check_positive("posterior.n", self.n, ConfigError))
        lam = self.prior_precision
        if isinstance(lam, str):
            if lam not in PRIOR_PRECISION_MODES:
                raise ConfigError(
                    "posterior.prior_precision must be a positive number, "
                    f"{' or '.join(repr(m) for m in PRIOR_PRECISION_MODES)}; got {lam!r}"
                )
        else:
            _set(self, "prior_precision", check_positive("posterior.prior_precision", lam, ConfigError))
        check_choice("posterior.evidence_variant", self.evidence_variant, EVIDENCE_VARIANTS, ConfigError)


@dataclass(frozen=True, kw_only=True)
class PathSettings:
    """The ``paths`` group: where caches, results and logs go."""

    cache_dir: str
    results_dir: str
    log_dir: str


# -------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True, kw_only=True)
class ZeroShotSettings:
    """``task=zeroshot``: every method of ``methods`` on the same cached features."""

    name: str
    ece_bins: int
    # Method name -> its ``_target_`` spec in the config; the built methods here.
    methods: Mapping[str, Method] = field(metadata={"schema": Schema.METHODS})
    plots: bool = True
    objective: Objective | None = None
    # The image-caption pairs ProbVLM trains on when they are not the run's hessian_data (a hessian_data
    # option, chosen with hessian_data@task.pairs=<option>): with published factors, which have no pairs.
    pairs: Mapping[str, Any] | HessianDataSettings | None = field(
        default=None, metadata={"schema": Schema.PAIR_DATA}
    )

    def __post_init__(self) -> None:
        _set(self, "ece_bins", check_positive_int("task.ece_bins", self.ece_bins, ConfigError))
        if self.pairs is not None and not isinstance(self.pairs, PairDataSettings | PublishedFactorsSettings):
            _set(self, "pairs", hessian_data_settings(self.pairs, "task.pairs"))
        if not isinstance(self.methods, Mapping):
            raise ConfigError(f"task.methods must be a section of methods, got {self.methods!r}")
        _set(
            self,
            "methods",
            {
                name: spec if isinstance(spec, Method) else _method(f"task.methods.{name}", spec)
                for name, spec in self.methods.items()
                if spec is not None
            },
        )
        _set(self, "plots", _bool("task.plots", self.plots))
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ConfigError(
                f"task.objective must be null or {' or '.join(OBJECTIVES)}, got {self.objective!r}"
            )

    def fitted_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        """The structures whose posteriors the task fits (BayesVLM rows of the other structures drop)."""
        return posterior.structures

    def evidence_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        """The structures whose prior precision the task sets (by the evidence, by default)."""
        return posterior.structures


def _method(path: str, spec: Any) -> Method:
    try:
        method = instantiate(spec)
    except InstantiationException as err:  # the constructor refused an argument, e.g. tta views: 0
        raise ConfigError(f"{path}: {err.__cause__ or err}") from err
    if not isinstance(method, Method):
        raise ConfigError(f"{path}._target_ must be a uqvlm.methods.Method, got {type(method).__name__}")
    return method


@dataclass(frozen=True, kw_only=True)
class HessianTaskSettings:
    """``task=hessian``: estimate and cache the posteriors of ``posterior.structures`` (KFAC if none)."""

    name: str

    def fitted_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return posterior.structures or (KFACPosterior.structure,)

    def evidence_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return ()  # it builds the posteriors only


@dataclass(frozen=True, kw_only=True)
class HessianMergeSettings(HessianTaskSettings):
    """``task=hessian_merge``: merge the cached parts of ``hessian_data.num_parts`` into the posteriors."""


@dataclass(frozen=True, kw_only=True)
class PerSplit:
    """One value per split (images per domain and split, or the fractions of a seeded split)."""

    train: Any = None
    val: Any = None
    test: Any = None


@dataclass(frozen=True, kw_only=True)
class SplitSettings:
    """``task.data.splits``: ``native`` splits of the dataset, ``seeded`` fractions of each domain (by
    ``seed``), or the ``published`` BayesVLM split (its own seed, 42)."""

    by: str = "native"
    seed: int = 0
    fractions: PerSplit = field(default_factory=PerSplit)


@dataclass(frozen=True, kw_only=True)
class ActiveDataSettings:
    """``task.data``: the domains of the pool and the target (``section``: the whole, for
    ``active.domains.build_domain_data``)."""

    name: str
    root: str | None = None  # a folder the domains' sections may interpolate
    target: str
    common: Mapping[str, Any] = field(default_factory=dict, metadata={"schema": Schema.DATASET})
    domains: Mapping[str, Any] = field(metadata={"schema": Schema.DOMAINS})
    pool: tuple[str, ...] | None = None  # null: every domain
    include_target_in_pool: bool = False
    align: str = "names"  # how classes match across domains: names | class_ids (active/domains.py)
    splits: SplitSettings = field(default_factory=SplitSettings)
    sizes: PerSplit = field(default_factory=PerSplit)
    section: Mapping[str, Any] = field(default_factory=dict, metadata=WHOLE_SECTION)

    def __post_init__(self) -> None:
        if not isinstance(self.domains, Mapping) or not self.domains:
            raise ConfigError(f"task.data.domains must name at least one domain, got {self.domains!r}")
        if self.pool is not None:
            _set(self, "pool", _names("task.data.pool", self.pool))
        _set(
            self,
            "include_target_in_pool",
            _bool("task.data.include_target_in_pool", self.include_target_in_pool),
        )
        pool_domains(self.section)
        split_mode(self.section)
        align_mode(self.section)


@dataclass(frozen=True, kw_only=True)
class EpigSettings:
    """``task.epig``: EPIG's candidate set, lazy evaluation and sampling dtype."""

    candidates: str
    lazy: bool
    batch: int
    update_scale: int  # data points an acquired image counts as (N grows by as much)
    dtype: str

    def __post_init__(self) -> None:
        check_choice("task.epig.candidates", self.candidates, EPIG_CANDIDATES, ConfigError)
        _set(self, "lazy", _bool("task.epig.lazy", self.lazy))
        _set(self, "batch", check_positive_int("task.epig.batch", self.batch, ConfigError))
        scale = self.update_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or scale != int(scale) or scale < 1:
            raise ConfigError(
                "task.epig.update_scale must be a positive integer (the data points an acquired image counts "
                f"as), got {scale!r}"
            )
        _set(self, "update_scale", int(scale))
        if self.dtype not in EPIG_DTYPES:
            raise ConfigError(f"task.epig.dtype must be {' or '.join(EPIG_DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True, kw_only=True)
class ActiveLearningSettings:
    """``task=active_learning``: strategies x budgets x seeds, scored with ``predictive``."""

    name: str
    data: ActiveDataSettings
    strategies: tuple[str, ...]
    budgets: tuple[int, ...]  # sorted, without repeats
    seeds: tuple[int, ...]
    structure: str  # of the posteriors BALD, EPIG, targeting and the BayesVLM predictive use
    predictive: Predictive
    mc_samples: int  # samples of the Monte Carlo predictive
    samples: int  # joint weight samples of BALD and EPIG
    k_nearest: int
    distance: str
    epig: EpigSettings
    finetune: FinetuneConfig
    ece_bins: int

    def __post_init__(self) -> None:
        strategies = _names("task.strategies", self.strategies)
        if unknown := [s for s in strategies if s not in STRATEGIES]:
            raise ConfigError(f"unknown strategies {unknown}; available: {', '.join(STRATEGIES)}")
        budgets = tuple(sorted({_int("task.budgets", b) for b in _names("task.budgets", self.budgets)}))
        seeds = tuple(_int("task.seeds", s) for s in _names("task.seeds", self.seeds))
        if not strategies or not budgets or not seeds or budgets[0] < 1:
            raise ConfigError("task.strategies, task.budgets (positive) and task.seeds must be non-empty")
        _set(self, "strategies", strategies)
        _set(self, "budgets", budgets)
        _set(self, "seeds", seeds)
        if self.structure not in FITTED_STRUCTURES:
            raise ConfigError(
                f"task.structure must be {' or '.join(map(repr, FITTED_STRUCTURES))}, got {self.structure!r}"
            )
        check_choice("task.predictive", self.predictive, PREDICTIVES, ConfigError)
        for name in ("mc_samples", "samples", "k_nearest", "ece_bins"):
            _set(self, name, check_positive_int(f"task.{name}", getattr(self, name), ConfigError))
        check_choice("task.distance", self.distance, DISTANCES, ConfigError)

    def fitted_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return (self.structure,)

    def evidence_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return (self.structure,)

    def acquisition(self) -> AcquisitionConfig:
        """The strategies' knobs."""
        return AcquisitionConfig(
            samples=self.samples,
            k_nearest=self.k_nearest,
            distance=self.distance,
            epig_candidates=self.epig.candidates,
            epig_lazy=self.epig.lazy,
            epig_batch=self.epig.batch,
            epig_update_scale=self.epig.update_scale,
            epig_dtype=EPIG_DTYPES[self.epig.dtype],
        )


# ------------------------------------------------------------------------------------------ studies
def _floats(path: str, value: Any, *, positive: bool = True, sort: bool = True) -> tuple[float, ...]:
    """A non-empty list of finite numbers (> 0, or >= 0 with ``positive=False``), sorted, without repeats."""
    items = _names(path, value)
    if not items:
        raise ConfigError(f"{path} must list at least one value")
    out = []
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            raise ConfigError(f"{path} must hold finite numbers, got {x!r}")
        if x < 0 or (positive and x == 0):
            raise ConfigError(f"{path} must hold numbers {'> 0' if positive else '>= 0'}, got {x!r}")
        out.append(float(x))
    return tuple(sorted(set(out))) if sort else tuple(out)


def _structure(path: str, value: Any) -> str:
    return check_choice(path, value, FITTED_STRUCTURES, ConfigError)


@dataclass(frozen=True, kw_only=True)
class OverheadSettings:
    """``task=overhead``: FLOPs and wall time of MAP vs the BayesVLM predictive (KFAC, probit) for a batch
    of ``batch`` images against each K of ``classes`` (``dataset``: the configured dataset's class count).
    Posteriors are synthetic, of the model's shapes: cost depends on shapes only."""

    DATASET_K = "dataset"

    name: str
    batch: int
    classes: tuple[int | str, ...]
    repeats: int
    warmup: int

    def __post_init__(self) -> None:
        _set(self, "batch", check_positive_int("task.batch", self.batch, ConfigError))
        classes = _names("task.classes", self.classes)
        if not classes:
            raise ConfigError("task.classes must list at least one class count")
        for k in classes:
            if k != self.DATASET_K:
                check_positive_int("task.classes", k, ConfigError)
        _set(self, "classes", tuple(dict.fromkeys(classes)))
        _set(self, "repeats", check_positive_int("task.repeats", self.repeats, ConfigError))
        if _int("task.warmup", self.warmup) < 0:
            raise ConfigError(f"task.warmup must be >= 0, got {self.warmup}")

    def fitted_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return ()

    def evidence_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True, kw_only=True)
class CorruptionSettings:
    """``task=corruption``: the evaluated dataset under the published Gaussian pixel noise at each std of
    ``levels``; true-class ProbCosine and MAP vs BayesVLM (``structure``) metrics per level."""

    name: str
    levels: tuple[float, ...]
    structure: str
    ece_bins: int

    def __post_init__(self) -> None:
        _set(self, "levels", _floats("task.levels", self.levels, positive=False))
        _structure("task.structure", self.structure)
        _set(self, "ece_bins", check_positive_int("task.ece_bins", self.ece_bins, ConfigError))

    def fitted_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return (self.structure,)

    def evidence_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return (self.structure,)


@dataclass(frozen=True, kw_only=True)
class ProbCosineStudySettings:
    """``task=probcosine_study``: ProbCosine against Monte Carlo for ``pairs`` images (each with its true
    class and one other class) at each pseudo-data count of ``widths`` (the posterior width), with
    ``samples`` draws per pair; density figures of ``density_pairs`` pairs at each of ``density_widths``."""

    name: str
    structure: str
    widths: tuple[float, ...]
    pairs: int
    samples: int
    density_pairs: int
    density_widths: tuple[float, ...]

    def __post_init__(self) -> None:
        _structure("task.structure", self.structure)
        _set(self, "widths", _floats("task.widths", self.widths))
        for name in ("pairs", "density_pairs"):
            _set(self, name, check_positive_int(f"task.{name}", getattr(self, name), ConfigError))
        if _int("task.samples", self.samples) < 2:
            raise ConfigError(f"task.samples must be an integer >= 2, got {self.samples}")
        _set(self, "density_widths", _floats("task.density_widths", self.density_widths))

    def fitted_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return (self.structure,)

    def evidence_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return (self.structure,)


@dataclass(frozen=True, kw_only=True)
class HessianSizeSettings:
    """``task=hessian_size``: the zero-shot evaluation with posteriors from the first N pairs of the Hessian
    data, for N in ``sizes`` (``all``: every pair), or ``num_sizes`` log-spaced N from ``min_size`` up to
    all when ``sizes`` is null."""

    ALL = "all"

    name: str
    sizes: tuple[int | str, ...] | None = None
    num_sizes: int
    min_size: int
    ece_bins: int

    def __post_init__(self) -> None:
        if self.sizes is not None:
            sizes = _names("task.sizes", self.sizes)
            if not sizes:
                raise ConfigError("task.sizes must be null or list at least one size")
            for size in sizes:
                if size != self.ALL:
                    check_positive_int("task.sizes", size, ConfigError)
            _set(self, "sizes", sizes)
        for name in ("num_sizes", "min_size", "ece_bins"):
            _set(self, name, check_positive_int(f"task.{name}", getattr(self, name), ConfigError))

    def fitted_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return posterior.structures

    def evidence_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return posterior.structures


@dataclass(frozen=True, kw_only=True)
class ProxyDataSettings:
    """``task=proxy_data``: the zero-shot evaluation with posteriors from the run's ``hessian_data``
    (in-distribution) and from ``proxy`` (a hessian_data option, chosen with
    ``hessian_data@task.proxy=<option>``)."""

    name: str
    proxy: Mapping[str, Any] | HessianDataSettings | None = field(
        default=None, metadata={"schema": Schema.PAIR_DATA}
    )
    ece_bins: int

    def __post_init__(self) -> None:
        if self.proxy is not None and not isinstance(self.proxy, PairDataSettings | PublishedFactorsSettings):
            _set(self, "proxy", hessian_data_settings(self.proxy, "task.proxy"))
        _set(self, "ece_bins", check_positive_int("task.ece_bins", self.ece_bins, ConfigError))

    def fitted_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return posterior.structures

    def evidence_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return posterior.structures


@dataclass(frozen=True, kw_only=True)
class PriorGridSettings:
    """``task=prior_grid``: NLL / ECE / accuracy of BayesVLM over the grid ``n_grid`` x ``lambda_grid``
    (the same lambda on both towers), beside the evidence's lambda at each n."""

    name: str
    n_grid: tuple[float, ...]
    lambda_grid: tuple[float, ...]
    ece_bins: int

    def __post_init__(self) -> None:
        _set(self, "n_grid", _floats("task.n_grid", self.n_grid))
        _set(self, "lambda_grid", _floats("task.lambda_grid", self.lambda_grid))
        _set(self, "ece_bins", check_positive_int("task.ece_bins", self.ece_bins, ConfigError))

    def fitted_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return posterior.structures

    def evidence_structures(self, posterior: PosteriorSettings) -> tuple[str, ...]:
        return posterior.structures


UNCERTAINTY_KINDS = ("entropy", "one_minus_max")


@dataclass(frozen=True, kw_only=True)
class UncertaintyErrorSettings(ActiveLearningSettings):
    """``task=uncertainty_error``: the active-learning setup (its settings, inherited); error rate per
    equal-mass bin of predictive uncertainty (``uncertainty``, ``bins`` bins) of the zero-shot BayesVLM
    predictive and of the predictive after fine-tuning on each strategy's selection at the largest budget
    (first seed)."""

    bins: int
    uncertainty: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "bins", check_positive_int("task.bins", self.bins, ConfigError))
        check_choice("task.uncertainty", self.uncertainty, UNCERTAINTY_KINDS, ConfigError)


TaskSettings = (
    ZeroShotSettings
    | HessianTaskSettings
    | HessianMergeSettings
    | ActiveLearningSettings
    | OverheadSettings
    | CorruptionSettings
    | ProbCosineStudySettings
    | HessianSizeSettings
    | ProxyDataSettings
    | PriorGridSettings
    | UncertaintyErrorSettings
)
# ``task.name`` -> its settings; the task's code is the module ``uqvlm.tasks.<name>``.
TASK_SETTINGS: dict[str, type[TaskSettings]] = {
    "zeroshot": ZeroShotSettings,
    "hessian": HessianTaskSettings,
    "hessian_merge": HessianMergeSettings,
    "active_learning": ActiveLearningSettings,
    "overhead": OverheadSettings,
    "corruption": CorruptionSettings,
    "probcosine_study": ProbCosineStudySettings,
    "hessian_size": HessianSizeSettings,
    "proxy_data": ProxyDataSettings,
    "prior_grid": PriorGridSettings,
    "uncertainty_error": UncertaintyErrorSettings,
}


# ------------------------------------------------------------------------------------------------ run
def _check_hessian_data_fits_model(model: ModelSettings, hessian_data: HessianDataSettings) -> None:
    """Hessian data made for another model stops the run before compute: the shapes world's pairs are for
    the tiny model only, the published factors for the four checkpoints they were computed on."""
    from uqvlm.models.tiny import MODEL_NAME
    from uqvlm.published import chosen_set, no_set_message

    tiny = model.name == MODEL_NAME
    if isinstance(hessian_data, PublishedFactorsSettings):
        if tiny:
            raise ConfigError(
                f"hessian_data=published: the published factors belong to real checkpoints, not to "
                f"{MODEL_NAME}; use hessian_data=shapes (its default) or a real model (e.g. model=clip-b32)"
            )
        chosen = chosen_set(hessian_data.checkpoint, model.name, model.pretrained)
        if chosen is None and hessian_data.dir is None:
            raise ConfigError(no_set_message(model.name, model.pretrained))
    elif hessian_data.kind == "shapes" and not tiny:
        raise ConfigError(
            f"hessian_data=shapes is the shapes world's curvature, made for {MODEL_NAME}, not for {model.name}: "
            "use its published factors (hessian_data=published, the default of the paper's models) or real "
            "image-caption pairs (hessian_data=laion400m | cc12m | flickr30k)"
        )


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Everything a task reads, checked; ``config`` is the composed config, resolved (the run record and
    its hash)."""

    model: ModelSettings
    dataset: DatasetSettings
    posterior: PosteriorSettings
    hessian_data: HessianDataSettings
    task: TaskSettings
    paths: PathSettings
    seed: int = 0
    device: str = "auto"
    num_workers: int | Literal["auto"] = "auto"
    compile: bool = False
    skip_existing: bool | Literal["auto"] = "auto"
    config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _set(self, "seed", _int("seed", self.seed))
        if self.num_workers != "auto" and _int("num_workers", self.num_workers) < 0:
            raise ConfigError(f"num_workers must be >= 0 or auto, got {self.num_workers}")
        _set(self, "compile", _bool("compile", self.compile))
        if self.skip_existing != "auto":
            _set(self, "skip_existing", _bool("skip_existing", self.skip_existing))
        on_diag = (
            ("task.structure=diag", "task.structure=kfac")
            if isinstance(self.task, ActiveLearningSettings)
            else ("posterior.structures includes diag", "posterior=kfac")
        )
        diag = DiagPosterior.structure
        if isinstance(self.hessian_data, PublishedFactorsSettings) and diag in self.task.fitted_structures(
            self.posterior
        ):
            raise ConfigError(
                f"hessian_data=published provides KFAC factors only: use {on_diag[1]}, or Hessian data "
                "(e.g. hessian_data=laion400m) for a diagonal posterior"
            )
        if self.task.fitted_structures(self.posterior):
            _check_hessian_data_fits_model(self.model, self.hessian_data)
        post = self.posterior
        if (
            post.prior_precision == "evidence"
            and post.evidence_variant != EXACT_EVIDENCE
            and diag in self.task.evidence_structures(post)
        ):
            raise ConfigError(
                f"posterior.evidence_variant={post.evidence_variant} (the published code's evidence) exists "
                f"for KFAC only, but {on_diag[0]}, whose evidence is exact only: use {on_diag[1]} with it, "
                f"or posterior.evidence_variant={EXACT_EVIDENCE}"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RunSettings:
        """The typed settings of a composed config (whose keys ``uqvlm.tasks.keys`` has checked)."""
        name = cfg.task.get("name")
        task_cls = TASK_SETTINGS.get(name)
        if task_cls is None:
            raise ConfigError(f"unknown task {name!r}; available: {', '.join(sorted(TASK_SETTINGS))}")
        if isinstance(data := cfg.task.get("data"), DictConfig):
            require_set(data, "task.data")  # before the domains' interpolations of an unset root fail
        return cls(
            model=build(ModelSettings, "model", plain_section(cfg.model, "model")),
            dataset=DatasetSettings.from_section(cfg.dataset),
            posterior=build(PosteriorSettings, "posterior", plain_section(cfg.posterior, "posterior")),
            hessian_data=hessian_data_settings(cfg.hessian_data),
            task=build(task_cls, "task", plain_section(cfg.task, "task")),
            paths=build(PathSettings, "paths", plain_section(cfg.paths, "paths")),
            seed=cfg.get("seed", 0),
            device=str(cfg.get("device", "auto")),
            num_workers=cfg.get("num_workers", "auto"),
            compile=cfg.get("compile", False),
            skip_existing=cfg.get("skip_existing", "auto"),
            config=plain_section(cfg, "the config"),
        )
