"""The runnable examples in uqvlm.laplace's docstrings (torchmetrics-style ``Example:`` blocks).

Run here, not by ``--doctest-modules``, so that ``pytest -q`` runs them without importing every module of
the tree as a doctest candidate.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import uqvlm.laplace

MODULES = ["uqvlm.laplace"] + [
    f"uqvlm.laplace.{m.name}" for m in pkgutil.iter_modules(uqvlm.laplace.__path__)
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples in {name} failed"


def test_laplace_has_an_example():
    assert doctest.DocTestFinder().find(uqvlm.laplace.Laplace)[0].examples
