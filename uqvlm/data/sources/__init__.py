"""Real-world datasets behind the one interface: Hugging Face datasets, image folders, webdataset tars.

- :class:`HFZeroShot` (:mod:`.hf`): a labelled Hugging Face dataset (hub id, ``save_to_disk`` folder, or
  a local copy of a hub repo such as clip-benchmark's ``wds_*`` webdataset repos with ``classnames.txt``
  and ``zeroshot_classification_templates.txt`` at the root).
- :class:`ImageFolderZeroShot` (:mod:`.imagefolder`): ``root/<class>/**/*.jpg``.
- :class:`ZhouSplitZeroShot` (:mod:`.splits`): a split of CoOp's ``split_zhou_<Dataset>.json`` (the
  published UCF101, SUN397 and EuroSAT test splits); the module also holds the seeded ``subset`` rules of
  the published ImageNet-R / ImageNet-Sketch splits and the active-learning domain splits.
- :class:`ImageNetRFolder` (:mod:`.imagenet`): the unpacked ImageNet-R tar read as BayesVLM reads it; the
  module pins the ImageNet / ImageNet-R / ImageNet-A WordNet ids that align classes across datasets.
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
from uqvlm.data.sources.imagenet import ImageNetRFolder
from uqvlm.data.sources.splits import SubsetView, ZhouSplitZeroShot
from uqvlm.data.sources.webdataset import WebDatasetPairs, expand_braces

__all__ = [
    "HFPairs",
    "HFZeroShot",
    "ImageFolderZeroShot",
    "ImageNetRFolder",
    "SubsetView",
    "WebDatasetPairs",
    "ZhouSplitZeroShot",
    "decode_image",
    "expand_braces",
]
