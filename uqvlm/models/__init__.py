"""open_clip models split at their last layers (:mod:`.vlm`), with weights found offline-first (:mod:`.weights`)."""

from uqvlm.models.vlm import VLM, load_vlm
from uqvlm.models.weights import check_model_name

__all__ = ["VLM", "check_model_name", "load_vlm"]
