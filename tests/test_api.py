"""The top-level API: ``import tfrec_recall as tr`` reaches the main classes without further imports, lazily,
and never hides a submodule."""
import importlib
import pkgutil
import subprocess
import sys

import pytest

import tfrec_recall as tr

SUBMODULES = tuple(m.name for m in pkgutil.iter_modules(tr.__path__))


def test_public_names_are_the_library_objects():
    from tfrec_recall.retrievers import BruteForce, MultiQueryRetriever
    from tfrec_recall.models import TwoTower
    from tfrec_recall.evaluation import evaluate
    from tfrec_recall.training import train
    assert tr.TwoTower is TwoTower and tr.BruteForce is BruteForce and tr.evaluate is evaluate and tr.train is train
    assert tr.MultiQueryRetriever is MultiQueryRetriever
    for name in tr.__all__:  # every advertised name resolves
        assert getattr(tr, name) is not None, name
    assert set(tr.__all__) <= set(dir(tr))


def test_submodules_are_not_shadowed():
    assert {"training", "evaluation", "retrievers", "features", "tasks", "export", "config"} <= set(SUBMODULES)
    for name in SUBMODULES:
        assert importlib.import_module(f"tfrec_recall.{name}") is getattr(tr, name), name
        assert name not in tr.__all__


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="module 'tfrec_recall' has no attribute 'TwoTowers'"):
        tr.TwoTowers


def test_import_alone_does_not_import_tensorflow():
    code = "import sys, tfrec_recall; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
