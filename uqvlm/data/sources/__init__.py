"""Real-world datasets behind the one interface: Hugging Face datasets, image folders, webdataset tars.

- :class:`HFZeroShot` (:mod:`.hf`): a labelled Hugging Face dataset (hub id, ``save_to_disk`` folder, or
  a local copy of a hub repo such as clip-benchmark's ``wds_*`` webdataset repos with ``classnames.txt``
  and ``zeroshot_classification_templates.txt`` at the root).
- :class:`ImageFolderZeroShot` (:mod:`.imagefolder`): ``root/<class>/**/*.jpg``.
- :class:`WebDatasetPairs` (:mod:`.webdataset`): local img2dataset-style tar shards (``<key>.jpg`` +
  ``<key>.txt``), indexed once so items can be read by position.
- :class:`HFPairs` (:mod:`.hf`): a Hugging Face image-caption dataset.

Everything is offline-first: hub datasets are served from the local caches, and a dataset that is not on
this machine raises :class:`~uqvlm.errors.DataUnavailableError` quickly, naming what to provide.

Bad images: ``on_bad_image="error"`` raises :class:`~uqvlm.errors.DatasetFormatError` naming the item;
``"skip"`` drops undecodable images of the labelled datasets when they are indexed (every selected image is
decoded once then, so evaluation sets never silently change their labels), and for the large pair datasets
replaces an undecodable item by the next decodable one (deterministic; counted per process in ``skipped``).
"""

from uqvlm.data.sources.common import decode_image
from uqvlm.data.sources.hf import HFPairs, HFZeroShot
from uqvlm.data.sources.imagefolder import ImageFolderZeroShot
from uqvlm.data.sources.webdataset import WebDatasetPairs, expand_braces

__all__ = [
    "HFPairs",
    "HFZeroShot",
    "ImageFolderZeroShot",
    "WebDatasetPairs",
    "decode_image",
    "expand_braces",
]
