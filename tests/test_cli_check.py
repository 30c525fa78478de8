"""`peering check CHECKPOINT`: the sanity check and deletion/insertion from the command line.

The checkpoint is the session's trained digits CNN saved the way `peering demo` saves its model (a
Lightning checkpoint of `DigitClassifier`), so no demo run is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from peering.cli import app
from peering.models import DigitClassifier

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def checkpoint(digits_checkpoint) -> Path:
    return digits_checkpoint


def test_check_prints_the_sanity_table_and_deletion_insertion(checkpoint):
    result = invoke("check", checkpoint, "--samples", "24", "--method", "gradient",
                    "--method", "input_x_gradient")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "the first 24 of the demo's held-out scikit-learn 8x8 digits" in out
    header = next(line for line in out.splitlines() if line.startswith("method"))
    assert header.split() == ["method", "fc2", "+fc1", "+conv2", "+conv1", "unrelated", "verdict"]
    table = [line.split() for line in out.splitlines() if len(line.split()) == 7]  # the sanity table
    rows = {cells[0]: cells for cells in table}
    assert rows["gradient"][-1] == "passes" and rows["input_x_gradient"][-1] == "fails"
    assert float(rows["gradient"][-3]) < 0.5 < float(rows["input_x_gradient"][-3])
    assert "input_x_gradient fails: with all 4 layers re-initialised" in out
    # the faithfulness table: the gradient's row comes after the sanity table's, and beats the control
    control = next(line for line in out.splitlines() if line.startswith("random (control)")).split()
    gradient = [line.split() for line in out.splitlines() if line.startswith("gradient ")][-1]
    assert len(gradient) == 3 and len(control) == 4
    assert float(gradient[1]) < float(control[2]) and float(gradient[2]) > float(control[3])


def test_check_on_given_images_and_the_runs_own_dataset(checkpoint, digits_split, tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray((digits_split[2][i, 0].numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    result = invoke("check", checkpoint, *paths, "--method", "gradient", "--no-faithfulness")
    assert result.exit_code == 0, result.output
    assert "on 3 given image(s)" in result.stdout and "Deletion" not in result.stdout


def test_check_bad_input(checkpoint, tmp_path):
    missing = invoke("check", tmp_path / "nope.ckpt")
    assert missing.exit_code == 2 and missing.stderr.startswith("error: checkpoint not found")
    other_size = tmp_path / "other" / "model.ckpt"
    other_size.parent.mkdir()
    torch.save({"state_dict": DigitClassifier(image_size=12).state_dict(),
                "hyper_parameters": {"image_size": 12}, "pytorch-lightning_version": pl.__version__},
               other_size)
    unknown = invoke("check", other_size)
    assert unknown.exit_code == 2
    assert "cannot tell which digits" in unknown.stderr and "pass IMAGE files" in unknown.stderr
    (other_size.parent / "run.json").write_text(json.dumps({"dataset": "digits", "seed": 0}))
    wrong = invoke("check", other_size)
    assert wrong.exit_code == 2
    assert "inputs [1, 12, 12], but the scikit-learn 8x8 digits are [1, 8, 8]" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1 and "Traceback" not in wrong.output
