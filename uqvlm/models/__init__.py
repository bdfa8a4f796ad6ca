"""open_clip models split at each tower's last layer (:mod:`.vlm`), with weights found offline-first
(:mod:`.weights`): ``load_vlm`` is the entry point.

``uqvlm.models.tiny`` and ``uqvlm.models.pretrained`` hold the tiny CLIP of the offline shapes world.
"""

from uqvlm.models.vlm import VLM, UnsupportedModelError, load_vlm
from uqvlm.models.weights import ModelNameError, check_model_name

__all__ = ["VLM", "ModelNameError", "UnsupportedModelError", "check_model_name", "load_vlm"]
