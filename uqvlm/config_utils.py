"""Config values as plain Python, for code that takes Hydra configs as well as dicts and lists."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from uqvlm.errors import DataUnavailableError

# omegaconf's mark of a mandatory value left unset, as a plain container keeps it.
MISSING = "???"


def unset_keys(section: Mapping) -> list[str]:
    """The keys of ``section`` (a DictConfig or a plain mapping) whose mandatory value is unset (``???``)."""
    if isinstance(section, DictConfig):
        return sorted(str(k) for k in section.keys() if OmegaConf.is_missing(section, k))
    return sorted(str(k) for k, v in section.items() if isinstance(v, str) and v == MISSING)


def require_set(value: Mapping, section: str) -> None:
    """Raise :class:`~uqvlm.errors.DataUnavailableError` naming the override to set when a mandatory value
    of the data section ``value`` (named ``section``: ``dataset``, ``hessian_data``) is unset (``???``)."""
    missing = unset_keys(value)
    if missing:
        name = value.get("name", "?") if "name" not in missing else "?"
        raise DataUnavailableError(
            f"{section} {name!r} needs {', '.join(missing)}: set it, e.g. on the command line "
            f"{section}.{missing[0]}=/path/to/data"
        )


def to_plain(value: Any, section: str | None = None) -> Any:
    """OmegaConf containers as plain dicts and lists, interpolations resolved; other values unchanged.

    ``section`` names the dataset config section ``value`` is (``dataset``, ``hessian_data``): a mandatory
    value left unset there (``???``) then raises :class:`~uqvlm.errors.DataUnavailableError` naming the key
    to set, instead of omegaconf's own error.
    """
    if section is not None and isinstance(value, Mapping):
        require_set(value, section)
    if not isinstance(value, (DictConfig, ListConfig)):
        return value
    try:
        return OmegaConf.to_container(value, resolve=True)
    except MissingMandatoryValue as e:
        if section is None:
            raise
        raise DataUnavailableError(f"dataset config is incomplete: {e}") from e
