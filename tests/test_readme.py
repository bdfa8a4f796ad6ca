"""README.md's Python API section is executed here, so the README and the code cannot drift apart."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def python_api_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("### Python API")
    return text[start : text.index("\n## ", start)]


def python_api_example() -> str:
    (block,) = re.findall(r"```python\n(.*?)```", python_api_section(), flags=re.S)
    return block


def imports_of(code: str) -> list[ast.ImportFrom]:
    return [node for node in ast.parse(code).body if isinstance(node, ast.ImportFrom)]


def test_example_imports_are_the_modules_public_names():
    imports = imports_of(python_api_example())
    assert {node.module for node in imports} >= {
        "uqvlm.laplace",
        "uqvlm.models",
        "uqvlm.probcosine",
        "uqvlm.metrics",
    }
    for node in imports:
        namespace: dict = {}
        exec(compile(ast.Module(body=[node], type_ignores=[]), "README.md", "exec"), namespace)
        public = importlib.import_module(node.module).__all__
        for alias in node.names:
            assert alias.name in namespace
            assert alias.name in public, f"{alias.name} is not in {node.module}.__all__"


def test_names_the_prose_lists_are_exported():
    """`uqvlm.x` (`a`, `b`, ...) in the section: each name is in that module's __all__."""
    listed = re.findall(r"`(uqvlm\.\w+)`\s*\(([^)]*)\)", python_api_section())
    assert listed
    for module, names in listed:
        public = importlib.import_module(module).__all__
        for name in re.findall(r"`(\w+)`", names):
            assert name in public, f"{name} is not in {module}.__all__"


def test_example_runs_on_the_tiny_model(tiny_checkpoint, monkeypatch, capsys):
    """The whole example, with the tiny shapes-world CLIP standing in for ViT-B-32 and shapes data for
    the user's images: it runs as written and predicts far above chance (1/8)."""
    import uqvlm.models
    from uqvlm.data.shapes import ShapesPairs, ShapesZeroShot

    real_load_vlm = uqvlm.models.load_vlm
    monkeypatch.setattr(
        uqvlm.models, "load_vlm", lambda *args, **kw: real_load_vlm("uqvlm-tiny", str(tiny_checkpoint))
    )
    pairs = ShapesPairs(split="hessian", n=256)
    test = ShapesZeroShot(domain="photo", split="test", n=200)
    images, captions = zip(*(pairs[i] for i in range(len(pairs))), strict=True)
    test_images, labels = zip(*(test[i] for i in range(len(test))), strict=True)
    namespace = {
        "images": list(images),
        "captions": list(captions),
        "test_images": list(test_images),
        "test_labels": torch.tensor(labels),
        "classnames": test.classnames,
    }
    exec(compile(python_api_example(), "README.md", "exec"), namespace)
    metrics = namespace["evaluate_log_probs"](namespace["log_probs"], namespace["test_labels"])
    assert str(metrics) in capsys.readouterr().out
    assert metrics["n"] == 200 and metrics["acc"] > 0.5
    assert all(p.prior_precision > 0 and p.fitted for p in namespace["posts"].values())
    # The posterior widens the predictive: not the MAP softmax.
    assert not torch.allclose(namespace["var"], torch.zeros_like(namespace["var"]))


@pytest.mark.parametrize("module", ["uqvlm.laplace", "uqvlm.models", "uqvlm.probcosine", "uqvlm.metrics"])
def test_all_names_exist(module):
    mod = importlib.import_module(module)
    assert [name for name in mod.__all__ if not hasattr(mod, name)] == []
