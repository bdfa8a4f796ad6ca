"""Real-world datasets behind the one interface: Hugging Face datasets, image folders, webdataset tars."""

from uqvlm.data.sources.hf import (
    HFPairs,
    HFZeroShot,
    ImageFolderZeroShot,
    WebDatasetPairs,
    decode_image,
    expand_braces,
)

__all__ = [
    "HFPairs",
    "HFZeroShot",
    "ImageFolderZeroShot",
    "WebDatasetPairs",
    "decode_image",
    "expand_braces",
]
