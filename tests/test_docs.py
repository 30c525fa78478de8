"""Every docstring example in the package runs, and so do the examples of the README and of docs/*.md;
every name they use imports."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import inspect
import pkgutil
import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch

import peering

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(peering.__path__, prefix="peering.")
    if not name.rsplit(".", 1)[-1].startswith("_")
)
ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that train write lightning_logs/ or PNGs into the working dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_every_public_function_has_an_example():
    """The house rule: a runnable example in the docstring of every public function and of every class
    that does something (result records and exceptions are documented by their attributes instead)."""
    missing = []
    for module in MODULES:
        mod = importlib.import_module(module)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if getattr(obj, "__module__", None) != module or ">>>" in (obj.__doc__ or ""):
                continue
            record = inspect.isclass(obj) and (dataclasses.is_dataclass(obj) or issubclass(obj, Exception))
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not record:
                missing.append(f"{module}.{name}")
    assert not missing, f"public callables without a >>> example: {missing}"


# ------------------------------------------------------------------------- the README's and docs' examples
#
# Every ```python block of README.md and docs/*.md runs, in order, one namespace per page, in an empty
# folder, after what the page assumes the reader has (`_GIVEN`: a model, loaders, a tiny BERT; the files
# of "Your own image model"). A block preceded by ``<!-- not run: why -->`` is skipped; a ```bash block
# preceded by ``<!-- run ... -->`` runs its ``peering ...`` lines through the real command line.

_BLOCK = re.compile(r"(<!-- (not run|run)[^>]*-->\n)?```(python|bash)\n(.*?)```", re.S)


def _pages() -> list[Path]:
    return [README, *sorted(p for p in DOCS.glob("*.md") if p.name != "index.md")]


def _blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """``(language, code, marker)`` of each fenced block, marker "run", "not run" or None."""
    return [(m.group(3), m.group(4), m.group(2)) for m in _BLOCK.finditer(page.read_text())]


def _tiny_bert():
    import transformers

    config = transformers.BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                     num_labels=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(config).eval()


def _loaders(digits):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = digits
    train = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[1500:1564], y[1500:1564]), batch_size=32)
    return train, val


_MYNET = """from torch import nn


class MyNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 16 * 16, 10))
"""
_WORDS = "a gripping , beautifully acted film dull and far too long the was not good bad".split()


def _own_models(folder: Path) -> None:
    """What "Your own image model" and "Your own text model" start from: mynet.py and its weights, two
    photos (of another size than the model's), and a save_pretrained folder of a (tiny) text classifier."""
    import numpy as np
    from PIL import Image
    from transformers import BertTokenizer

    (folder / "mynet.py").write_text(_MYNET)
    namespace: dict = {}
    exec(_MYNET, namespace)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(namespace["MyNet"]().state_dict(), folder / "mynet.pt")
    rng = np.random.default_rng(0)
    for name in ("cat.png", "dog.png"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS]) + "\n")
    model_dir = folder / "my-sentiment-model"
    _tiny_bert().save_pretrained(model_dir)
    BertTokenizer(str(vocab)).save_pretrained(model_dir)
    vocab.unlink()


def _lightning_model():
    """The demo's LightningModule, whose predict_step leaves the work to an `AttributionWriter`."""
    from peering.models import DigitClassifier

    class Explained(DigitClassifier):
        def predict_step(self, batch, batch_idx):
            return None

    return Explained(image_size=8)


def _given(page: str, folder: Path, digits, digits_cnn) -> dict:
    """The names a page's examples take as the reader's own."""
    import copy

    from peering.models import DigitMLP, train_classifier

    x, y = digits
    model = copy.deepcopy(digits_cnn)  # trained on a shuffled 80% of the digits (conftest)
    train_loader, val_loader = _loaders(digits)
    if page == "README.md":
        _own_models(folder)
        return {"model": _lightning_model(), "train_loader": train_loader,
                "val_loader": val_loader, "loader": val_loader}
    if page == "explain.md":
        ids = torch.randint(5, 120, (3, 7), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        return {"peering": peering, "bert": _tiny_bert(), "input_ids": ids, "mask": mask}
    if page == "morph.md":
        judge = train_classifier(DigitMLP(image_size=8), x[1600:], y[1600:], epochs=5)
        return {"peering": peering, "model": model, "x": x[1500:1504], "target": 8, "train_x": x[:1500],
                "train_y": y[:1500], "mlp": judge, "other_cnn": model}
    if page == "training.md":
        from types import SimpleNamespace

        return {"model": _lightning_model(), "train_loader": train_loader, "val_loader": val_loader,
                "module": SimpleNamespace(model=_tiny_bert()), "tokenizer": lambda ids: [str(i) for i in ids]}
    if page == "datasets.md":
        return {"model": _lightning_model(), "val_loader": val_loader}
    if page == "checks.md":
        return {"peering": peering, "model": model, "images": x}
    return {}


def _run_cli(code: str, where: str) -> None:
    from typer.testing import CliRunner

    from peering.cli import app

    for line in code.splitlines():
        if line.startswith("peering "):
            result = CliRunner().invoke(app, shlex.split(line)[1:])
            assert result.exit_code == 0, f"{where}: {line}\n{result.output}"


@pytest.mark.parametrize("page", [p.name for p in _pages()])
def test_the_examples_of_each_page_run(page, tmp_path, monkeypatch, digits, digits_cnn):
    path = README if page == "README.md" else DOCS / page
    blocks = _blocks(path)
    monkeypatch.chdir(tmp_path)  # examples write PNGs, lightning_logs/ and attributions/ here
    monkeypatch.syspath_prepend(str(tmp_path))  # `from mynet import MyNet`, as next to the reader's script
    given = _given(page, tmp_path, digits, digits_cnn)
    ran = 0
    for number, (language, code, marker) in enumerate(blocks, 1):
        where = f"{page}, block {number}"
        if language == "python" and marker != "not run":
            if page == "README.md" or number == 1:  # the README's sections stand alone; a page's build up
                namespace = dict(given)
            with warnings.catch_warnings():  # e.g. "1 of 8 morphs did not reach": what a reader sees too
                warnings.simplefilter("ignore")
                exec(compile(code, where, "exec"), namespace)
            ran += 1
        elif language == "bash" and marker == "run":
            _run_cli(code, where)
            ran += 1
    if page == "README.md":
        assert ran >= 6, "the README lost examples"
        for picture in ("explain.png", "morph.png", "portraits.png", "explained.png", "text.png"):
            assert (tmp_path / picture).stat().st_size > 0, picture
        assert (tmp_path / "attributions" / "manifest.json").is_file()


def test_every_python_example_is_run_or_says_why_not():
    skipped = [(p.name, code[:40]) for p in _pages() for lang, code, marker in _blocks(p)
               if lang == "python" and marker == "not run"]
    assert len(skipped) <= 2, skipped


def _readme_names() -> set[str]:
    """Every peering name the README and docs/ use: ``from peering.x import a, b`` in their code, every
    ``peering.x.y`` path in their text and code (dotted attribute paths, not file names), and every
    ``::: peering.x`` of the API pages."""
    text = "\n".join(p.read_text() for p in [*_pages(), *sorted((DOCS / "api").glob("*.md"))])
    names: set[str] = set()
    for module, imported in re.findall(r"from (peering(?:\.\w+)*) import ([\w, ]+)", text):
        names.update(f"{module}.{n.strip()}" for n in imported.split(",") if n.strip())
    for path in re.findall(r"(?<![\w/.])peering(?:\.[A-Za-z_]\w*)+", text):
        names.add(path)
    return {n for n in names if not n.endswith((".py", ".md", ".json", ".html", ".png", ".ckpt"))}


def test_every_name_in_the_readme_imports():
    """What the README and docs/ tell people to import or call exists where they say (old paths too)."""
    missing = []
    for name in sorted(_readme_names()):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert len(_readme_names()) > 20, "the README's names were not found"
    assert not missing, f"README names that do not import: {missing}"


def test_a_run_without_mnist_says_at_the_end_how_many_tests_it_skipped_and_how_to_get_it(tmp_path):
    """`make test` without PEERING_DATA_DIR: the last lines count the skipped MNIST tests and say how to run
    them (tests/conftest.py's pytest_terminal_summary)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PEERING_DATA_DIR"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_data.py::test_t10k_shape_dtype_range_and_label_counts"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    tail = run.stdout.strip().splitlines()[-5:]
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 test skipped: MNIST not found" in tail[0], tail
    assert "download_mnist" in "\n".join(tail) and "PEERING_DATA_DIR=" in "\n".join(tail)
    assert tail[-1].startswith("1 skipped"), tail
