"""open_clip models split at each tower's last layer: ``load_vlm`` is the entry point.

``uqvlm.models.tiny`` and ``uqvlm.models.pretrained`` hold the tiny CLIP of the offline shapes world.
"""

from uqvlm.models.adapter import VLM, ModelNameError, UnsupportedModelError, check_model_name, load_vlm

__all__ = ["VLM", "ModelNameError", "UnsupportedModelError", "check_model_name", "load_vlm"]
