"""Errors uqvlm reports to users as a clear message, without a traceback."""


class UqvlmError(Exception):
    """Base class: the CLI prints these as one clear message."""


class WeightsUnavailableError(UqvlmError):
    """Model weights are not on this machine and cannot be downloaded."""


class DataUnavailableError(UqvlmError):
    """A dataset is not on this machine, cannot be downloaded, or is empty."""


class DatasetFormatError(UqvlmError):
    """A dataset is present but malformed (labels vs class names, undecodable images, layout)."""
