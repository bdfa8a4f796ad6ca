"""The ``dataset`` and ``hessian_data`` config sections as typed settings.

A data section holds the keys the tasks read (the fields below, except ``section``) beside its kind's
constructor arguments. :mod:`uqvlm.data.registry` takes exactly these two sets of keys and refuses any
other, so the fields here are the one declaration of the tasks' keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from uqvlm.errors import ConfigError
from uqvlm.validation import check_positive_int

# N of the authors' published factors (scripts/hessian_estimation.py --max_datapoints: 10 x 32,768 pairs).
PUBLISHED_NUM_DATA = 327_680
# Metadata of the field that keeps a whole section (for the registry); it is not a key of the section.
WHOLE_SECTION = {"whole_section": True}


def task_keys(cls: type) -> frozenset[str]:
    """The keys a section typed by the dataclass ``cls`` holds for the tasks (its fields but the whole)."""
    return frozenset(f.name for f in fields(cls) if not f.metadata.get("whole_section"))


def plain_section(node: Any, path: str) -> dict[str, Any]:
    """A config section as a plain dict, interpolations resolved; unset mandatory values stay ``???``
    (a data section's loader names them when it needs them)."""
    if isinstance(node, DictConfig):
        try:
            node = OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {err}") from None
    if not isinstance(node, Mapping):
        raise ConfigError(f"{path} must be a section of keys, got {node!r}")
    return dict(node)


PROTOCOL_KEY = "protocol"
PROTOCOLS_KEY = "protocols"


def apply_protocol(section: Mapping[str, Any], path: str = "dataset") -> dict[str, Any]:
    """A dataset section that offers ``protocols`` as the section of the one its ``protocol`` names: that
    protocol's entry merged over the shared keys (the entry's keys win: they fix what the protocol reads,
    e.g. its ``kind`` and ``source``), ``protocols`` dropped. A section without ``protocols`` is returned as
    it is. (configs/dataset/*.yaml; the keys a protocol's kind does not read are dropped by the registry.)
    """
    section = dict(section)
    protocols = section.pop(PROTOCOLS_KEY, None)
    if protocols is None:
        return section
    if not isinstance(protocols, Mapping) or not protocols:
        raise ConfigError(f"{path}.{PROTOCOLS_KEY} must map each protocol name to the keys it sets")
    chosen = section.get(PROTOCOL_KEY)
    if chosen not in protocols:
        raise ConfigError(
            f"{path}.{PROTOCOL_KEY} must be one of {', '.join(map(str, protocols))} for this dataset, got {chosen!r}"
        )
    entry = protocols[chosen] or {}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{path}.{PROTOCOLS_KEY}.{chosen} must be a section of keys, got {entry!r}")
    return {**section, **entry}


def _required(section: Mapping[str, Any], path: str, key: str) -> Any:
    if section.get(key) is None:
        raise ConfigError(f"{path}.{key} is not set")
    return section[key]


@dataclass(frozen=True, kw_only=True)
class DatasetSettings:
    """A ``dataset`` section: ``name`` names the results, ``val_split`` is the labelled split of methods
    fitted on labels, ``section`` the whole section for the registry (its chosen protocol applied)."""

    name: str
    kind: str
    val_split: str | None = None
    section: Mapping[str, Any] = field(default_factory=dict, metadata=WHOLE_SECTION)

    @classmethod
    def from_section(cls, node: Any, path: str = "dataset") -> DatasetSettings:
        section = apply_protocol(plain_section(node, path), path)
        return cls(
            name=str(_required(section, path, "name")),
            kind=str(_required(section, path, "kind")),
            val_split=section.get("val_split"),
            section=section,
        )

    def split(self, split: str) -> dict[str, Any]:
        """The section for another split of the same data."""
        return {**self.section, "split": split}


@dataclass(frozen=True, kw_only=True)
class PairDataSettings:
    """A ``hessian_data`` section of image-caption pairs: ``class_batch`` pairs per contrastive class batch
    (the targets of a source are the other modality's embeddings of the same batch). The class batches
    may be split over ``num_parts`` jobs, this one computing ``part`` (null: every part, in turn)."""

    name: str
    kind: str
    class_batch: int
    num_parts: int = 1
    part: int | None = None
    section: Mapping[str, Any] = field(default_factory=dict, metadata=WHOLE_SECTION)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "class_batch", check_positive_int("hessian_data.class_batch", self.class_batch, ConfigError)
        )
        num_parts = check_positive_int("hessian_data.num_parts", self.num_parts, ConfigError)
        object.__setattr__(self, "num_parts", num_parts)
        part = self.part
        if part is not None and (
            isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < num_parts
        ):
            raise ConfigError(
                f"hessian_data.part must be null (every part) or an integer in [0, {num_parts}) "
                f"(hessian_data.num_parts={num_parts}), got {part!r}"
            )


@dataclass(frozen=True, kw_only=True)
class PublishedFactorsSettings:
    """``hessian_data=published``: the authors' KFAC factors of the set ``checkpoint`` (None: the model's
    own), downloaded from ``base_url`` into the cache or read from a local ``dir`` (uqvlm/published.py);
    ``num_data`` (N, the pairs behind them) is recorded on the posteriors so they can be extended."""

    KIND = "published"

    name: str
    kind: str
    checkpoint: str | None = None
    base_url: str | None = None
    dir: str | None = None
    num_data: int = PUBLISHED_NUM_DATA
    section: Mapping[str, Any] = field(default_factory=dict, metadata=WHOLE_SECTION)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "num_data", check_positive_int("hessian_data.num_data", self.num_data, ConfigError)
        )
        if self.dir is None and not self.base_url:
            raise ConfigError("hessian_data=published needs hessian_data.base_url or hessian_data.dir")


HessianDataSettings = PairDataSettings | PublishedFactorsSettings


def hessian_data_settings(node: Any, path: str = "hessian_data") -> HessianDataSettings:
    """The typed ``hessian_data`` section: published factors or image-caption pairs, by its ``kind``."""
    section = plain_section(node, path)
    name, kind = str(_required(section, path, "name")), str(_required(section, path, "kind"))
    if kind == PublishedFactorsSettings.KIND:
        keys = ("checkpoint", "base_url", "dir", "num_data")
        return PublishedFactorsSettings(
            name=name, kind=kind, **{k: section[k] for k in keys if k in section}, section=section
        )
    return PairDataSettings(
        name=name,
        kind=kind,
        class_batch=_required(section, path, "class_batch"),
        num_parts=section.get("num_parts", 1),
        part=section.get("part"),
        section=section,
    )
