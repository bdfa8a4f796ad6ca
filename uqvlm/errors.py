"""Errors uqvlm reports to users as a clear message, without a traceback."""


class UqvlmError(Exception):
    """Base class: the CLI prints these as one clear message."""


class ConfigError(UqvlmError, ValueError):
    """A setting has a value uqvlm refuses (the message names its config key). Also a ValueError, as a bad
    argument is to the library functions that raise it."""


class WeightsUnavailableError(UqvlmError):
    """Model weights are not on this machine and cannot be downloaded."""


class DataUnavailableError(UqvlmError):
    """A dataset is not on this machine, cannot be downloaded, or is empty."""


class DatasetFormatError(UqvlmError):
    """A dataset is present but malformed (labels vs class names, undecodable images, layout)."""
