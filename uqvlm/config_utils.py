"""Config values as plain Python, for code that takes Hydra configs as well as dicts and lists."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from uqvlm.errors import DataUnavailableError


def to_plain(value: Any, section: str | None = None) -> Any:
    """OmegaConf containers as plain dicts and lists, interpolations resolved; other values unchanged.

    ``section`` names the dataset config section ``value`` is (``dataset``, ``hessian_data``): a mandatory
    value left unset there (``???``) then raises :class:`~uqvlm.errors.DataUnavailableError` naming the key
    to set, instead of omegaconf's own error.
    """
    if section is not None and isinstance(value, DictConfig):
        missing = sorted(k for k in value.keys() if OmegaConf.is_missing(value, k))
        if missing:
            name = value.get("name", "?") if "name" not in missing else "?"
            raise DataUnavailableError(
                f"{section} {name!r} needs {', '.join(missing)}: set it, e.g. on the command line "
                f"{section}.{missing[0]}=/path/to/data"
            )
    if not isinstance(value, (DictConfig, ListConfig)):
        return value
    try:
        return OmegaConf.to_container(value, resolve=True)
    except MissingMandatoryValue as e:
        if section is None:
            raise
        raise DataUnavailableError(f"dataset config is incomplete: {e}") from e
