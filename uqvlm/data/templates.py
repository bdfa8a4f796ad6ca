"""Prompt template sets, selectable by name; ``{c}`` is the class-name placeholder.

``paper`` is BayesVLM's single prompt, exactly ``An image of a {class_name}`` with no trailing period
(``text_prompt`` of bayesvlm/data/factory.py and every data module @ 855be8b). ``clip_benchmark`` is the
dataset's own ``zeroshot_classification_templates.txt`` of a CLIP_benchmark repo (same as ``{from: file}``).
The other ensembles are OpenAI CLIP's (its ``prompts.md`` / ImageNet notebook), which CLIP_benchmark reuses
per dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

PAPER: list[str] = ["An image of a {c}"]

# open_clip keeps these as lambdas; calling them with the placeholder turns them into format strings.
OPENAI_IMAGENET: list[str] = [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]  # 80
OPENAI_IMAGENET_SIMPLE: list[str] = [t("{c}") for t in SIMPLE_IMAGENET_TEMPLATES]  # 7

CIFAR: list[str] = [
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low contrast photo of a {c}.",
    "a high contrast photo of a {c}.",
    "a bad photo of a {c}.",
    "a good photo of a {c}.",
    "a photo of a small {c}.",
    "a photo of a big {c}.",
    "a photo of the {c}.",
    "a blurry photo of the {c}.",
    "a black and white photo of the {c}.",
    "a low contrast photo of the {c}.",
    "a high contrast photo of the {c}.",
    "a bad photo of the {c}.",
    "a good photo of the {c}.",
    "a photo of the small {c}.",
    "a photo of the big {c}.",
]

FOOD101: list[str] = ["a photo of {c}, a type of food."]

FLOWERS: list[str] = ["a photo of a {c}, a type of flower."]

SUN397: list[str] = ["a photo of a {c}.", "a photo of the {c}."]

DTD: list[str] = [
    "a photo of a {c} texture.",
    "a photo of a {c} pattern.",
    "a photo of a {c} thing.",
    "a photo of a {c} object.",
    "a photo of the {c} texture.",
    "a photo of the {c} pattern.",
    "a photo of the {c} thing.",
    "a photo of the {c} object.",
]

EUROSAT: list[str] = [
    "a centered satellite photo of {c}.",
    "a centered satellite photo of a {c}.",
    "a centered satellite photo of the {c}.",
]

# OpenAI's 48 UCF101 prompts: {photo, video, example, demonstration} x {a, the} person x six verbs.
UCF101: list[str] = [
    f"a {medium} of {det} person {verb}{{c}}."
    for verb in ("", "using ", "doing ", "during ", "performing ", "practicing ")
    for det in ("a", "the")
    for medium in ("photo", "video", "example", "demonstration")
]

TEMPLATE_SETS: dict[str, list[str]] = {
    "paper": PAPER,
    "openai_imagenet": OPENAI_IMAGENET,
    "openai_imagenet_simple": OPENAI_IMAGENET_SIMPLE,
    "cifar10": CIFAR,
    "cifar100": CIFAR,
    "food101": FOOD101,
    "flowers": FLOWERS,
    "flowers102": FLOWERS,
    "sun397": SUN397,
    "dtd": DTD,
    "eurosat": EUROSAT,
    "ucf101": UCF101,
    "imagenet-r": OPENAI_IMAGENET,
    "imagenet-sketch": OPENAI_IMAGENET,
}
ALIASES = {"default": "paper", "imagenet": "openai_imagenet", "openai": "openai_imagenet"}
# The set read from the dataset's templates file rather than named here.
FROM_FILE = "clip_benchmark"


def get_templates(name: str) -> list[str]:
    """A named template set (a copy); KeyError listing the names when unknown."""
    key = ALIASES.get(name, name)
    if key not in TEMPLATE_SETS:
        known = ", ".join(sorted([*TEMPLATE_SETS, FROM_FILE]))
        raise KeyError(f"unknown template set {name!r}; known: {known}")
    return list(TEMPLATE_SETS[key])


def check_templates(templates: Sequence[str]) -> list[str]:
    """Validate user templates: a non-empty list of strings, each with one ``{c}`` and no other field."""
    out = [str(t) for t in templates]
    if not out:
        raise ValueError("templates must not be empty")
    for t in out:
        try:
            t.format(c="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"template {t!r} must use only the placeholder {{c}} ({e})") from e
        if "{c}" not in t:
            raise ValueError(f"template {t!r} lacks the class placeholder {{c}}")
    return out


def resolve_templates(spec: Any) -> list[str] | None:
    """A template spec from a config: a set name, a list of templates, or None.

    Returns None for ``{"from": "file"}`` and ``clip_benchmark`` (the caller reads the dataset's own
    templates file).
    """
    if spec is None:
        return get_templates("paper")
    if spec == FROM_FILE:
        return None
    if isinstance(spec, str):
        return get_templates(spec)
    if isinstance(spec, Mapping):
        if spec.get("from") == "file":
            return None
        if "name" in spec:
            return get_templates(str(spec["name"]))
        raise ValueError(f"templates mapping must be {{from: file}} or {{name: ...}}, got {dict(spec)}")
    return check_templates(list(spec))
