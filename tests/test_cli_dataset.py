"""`peering explain-dataset` through Typer's runner: a data set or a folder of images explained into shards
that `load_attributions` reads back with `peering.explain`'s numbers; reruns resume; bad input is one
``error:`` line and exit code 2."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import peering
from peering.cli import app, read_image
from tests._close import assert_close
from tests.test_cli import assert_bad_input, invoke

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(digits_checkpoint):
    """A Lightning checkpoint of the demo model holding the trained `digits_cnn`'s weights."""
    return digits_checkpoint


def test_digits_are_explained_in_order_and_a_rerun_resumes(checkpoint, digits, digits_cnn, tmp_path):
    out = tmp_path / "run"
    result = invoke("explain-dataset", checkpoint, "--data", "digits", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "explained 1,797 of 1,797 samples" in result.stdout
    run = peering.load_attributions(out)
    x, y = digits
    expected = peering.explain(digits_cnn, x, top_k=2)
    assert run.indices.tolist() == list(range(len(x))) and torch.equal(run.labels, y)
    assert torch.equal(run.targets, expected.targets)
    assert_close(run.attributions[:], expected.attributions)
    assert json.loads((out / "dataset.json").read_text())["data"] == "digits"

    again = invoke("explain-dataset", checkpoint, "--data", "digits", "--out", out, "--no-progress")
    assert again.exit_code == 0, again.output
    assert "explained 0 of 1,797 samples" in again.stdout and "1,797 were already done" in again.stdout


def test_normalised_inputs_are_explained_as_the_model_sees_them(checkpoint, digits, digits_cnn, tmp_path):
    """--mean/--std: the model is fed (x - mean) / std, the attributions are those `explain` gives on them
    (as `peering explain --mean/--std`), dataset.json records it, a rerun with another normalisation is
    refused, and the report says what the model saw."""
    from tests.test_report import parse

    out = tmp_path / "run"
    args = ("explain-dataset", checkpoint, "--data", "digits", "--out", out, "--no-progress")
    result = invoke(*args, "--mean", "0.5", "--std", "0.25")
    assert result.exit_code == 0, result.output
    x, _ = digits
    expected = peering.explain(digits_cnn, (x - 0.5) / 0.25, top_k=2)
    run = peering.load_attributions(out)
    assert torch.equal(run.targets, expected.targets)
    assert_close(run.attributions[:], expected.attributions)
    assert_close(run.logits, expected.logits)
    with torch.no_grad():
        assert not torch.allclose(run.logits, digits_cnn.eval()(x))  # not the raw images' logits
    assert json.loads((out / "dataset.json").read_text())["normalisation"] == {"mean": [0.5], "std": [0.25]}
    assert_bad_input(invoke(*args, "--mean", "0.4", "--std", "0.25"), "other data")
    assert_bad_input(invoke(*args, "--mean", "0.5"), "--mean and --std go together")
    assert invoke("report", out).exit_code == 0
    text = " ".join(parse(out / "report.html").text)
    assert "the model saw (x - mean) / std (mean [0.5], std [0.25])" in text


def _save_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_a_folder_of_images_with_class_subfolders(checkpoint, digits, digits_cnn, tmp_path):
    x, y = digits
    folder = tmp_path / "images"
    files = []
    for i in range(6):  # 16x16 PNGs (resized to the model's 8x8), in subfolders named by their label
        pixels = np.kron((x[i, 0].numpy() * 255).astype(np.uint8), np.ones((2, 2), np.uint8))
        name = f"{int(y[i])}/digit_{i}.png"
        _save_png(folder / name, pixels)
        files.append(name)
    out = tmp_path / "run"
    result = invoke(
        "explain-dataset",
        checkpoint,
        "--data",
        folder,
        "--out",
        out,
        "--no-progress",
        "--target",
        "label",
        "--method",
        "input_x_gradient",
    )
    assert result.exit_code == 0, result.output
    assert "resized 16x16 to 8x8" in result.stderr and "labels from the subfolder names" in result.stderr
    order = sorted(files)
    images = torch.stack([read_image(folder / f, 1, (8, 8))[0] for f in order])
    labels = torch.tensor([int(f.split("/")[0]) for f in order])
    run = peering.load_attributions(out)
    assert torch.equal(run.labels, labels) and torch.equal(run.targets, labels.unsqueeze(1))
    expected = peering.explain(digits_cnn, images, labels, method="input_x_gradient")
    assert_close(run.attributions[:], expected.attributions)
    assert json.loads((out / "dataset.json").read_text())["files"] == order


def test_bad_input_is_one_line(checkpoint, mnist_dir, tmp_path):
    out = tmp_path / "run"
    assert_bad_input(invoke("explain-dataset", checkpoint, "--data", "cifar", "--out", out), "cifar")
    assert_bad_input(
        invoke("explain-dataset", checkpoint, "--data", "mnist", "--data-dir", mnist_dir, "--out", out),
        "1x8x8",
        "1x28x28",
    )
    assert_bad_input(
        invoke("explain-dataset", checkpoint, "--data", "digits", "--target", "seven", "--out", out), "seven"
    )
    assert_bad_input(
        invoke("explain-dataset", checkpoint, "--data", "digits", "--target", "12", "--out", out), "12"
    )
    (tmp_path / "empty").mkdir()
    assert_bad_input(
        invoke("explain-dataset", checkpoint, "--data", tmp_path / "empty", "--out", out), "no images"
    )


def test_a_broken_image_names_the_file_and_the_rerun_resumes(checkpoint, digits, tmp_path):
    x, _ = digits
    folder = tmp_path / "images"
    for i in range(70):
        _save_png(folder / f"d{i:03d}.png", (x[i, 0].numpy() * 255).astype(np.uint8))
    (folder / "d065.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    args = (
        "explain-dataset",
        checkpoint,
        "--data",
        folder,
        "--out",
        out,
        "--no-progress",
        "--batch-size",
        "8",
    )
    result = invoke(*args)
    assert_bad_input(result, "d065.png")
    assert len(peering.load_attributions(out, allow_incomplete=True)) == 64  # the batches before it
    _save_png(folder / "d065.png", (x[65, 0].numpy() * 255).astype(np.uint8))
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "explained 6 of 70 samples" in again.stdout and "64 were already done" in again.stdout


def test_another_run_in_the_same_folder_is_refused(checkpoint, digits, tmp_path):
    x, _ = digits
    folder = tmp_path / "images"
    for i in range(3):
        _save_png(folder / f"d{i}.png", (x[i, 0].numpy() * 255).astype(np.uint8))
    out = tmp_path / "run"
    assert (
        invoke("explain-dataset", checkpoint, "--data", folder, "--out", out, "--no-progress").exit_code == 0
    )
    assert_bad_input(invoke("explain-dataset", checkpoint, "--data", "digits", "--out", out), "other data")
    assert_bad_input(
        invoke("explain-dataset", checkpoint, "--data", folder, "--out", out, "--method", "smoothgrad"),
        "other arguments",
        "method",
    )


def test_a_corrupt_manifest_is_rebuilt_by_the_rerun(checkpoint, digits, tmp_path):
    """The manifest's error says to rerun; the rerun rebuilds it from the shards (which it verifies)."""
    from peering.store import ShardError

    x, _ = digits
    folder = tmp_path / "images"
    for i in range(3):
        _save_png(folder / f"d{i}.png", (x[i, 0].numpy() * 255).astype(np.uint8))
    out = tmp_path / "run"
    args = ("explain-dataset", checkpoint, "--data", folder, "--out", out, "--no-progress")
    assert invoke(*args).exit_code == 0
    (out / "manifest.json").write_text('{"format": "peering-attr')  # cut short
    with pytest.raises(ShardError, match="rerun the same command"):
        peering.load_attributions(out)
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "Traceback" not in again.output
    assert "explained 0 of 3 samples" in again.stdout and "3 were already done" in again.stdout
    assert len(peering.load_attributions(out)) == 3


def test_report_of_a_dataset_run(checkpoint, digits, tmp_path):
    from tests.test_report import parse

    out = tmp_path / "run"
    assert (
        invoke("explain-dataset", checkpoint, "--data", "digits", "--out", out, "--no-progress").exit_code
        == 0
    )
    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    page = parse(out / "report.html")
    assert [attrs.get("id") for tag, attrs in page.tags if tag == "section"] == ["dataset"]
    images = page.all("img")
    assert [a["alt"] for a in images] == [
        "Most confident samples and their attributions",
        "Least confident samples and their attributions",
        "mean attribution map of each class",
    ]
    sizes = []
    for attrs in images:
        with Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1]))) as im:
            assert im.format == "PNG"
            sizes.append(im.size)
    assert all(height > width for width, height in sizes[:2])  # 8 rows of input + 2 maps each
    run = peering.load_attributions(out)
    x, y = digits
    accuracy = float((run.logits.argmax(1) == y).float().mean())
    text = " ".join(page.text)
    assert f"{accuracy:.2%} of 1,797 labelled samples" in text
    confidence = run.probabilities.max(1).values
    assert f"{float(confidence.min()):.1%}" in text and f"{float(confidence.max()):.1%}" in text

    # --mean/--std: the inputs the report draws are shown as x * std + mean; the maps are unchanged
    shown = tmp_path / "shown.html"
    result = invoke("report", out, "--mean", "0.5", "--std", "0.5", "-o", shown)
    assert result.exit_code == 0, result.output

    def most_confident(path) -> np.ndarray:
        src = parse(path).all("img")[0]["src"]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            return np.asarray(im.convert("RGB")).astype(np.float64)

    plain, normalised = most_confident(out / "report.html"), most_confident(shown)
    assert plain.shape == normalised.shape
    changed = (plain != normalised).any(axis=2)
    assert 0.05 < changed.mean() < 0.5  # the input tiles, not the maps or the captions
    np.testing.assert_allclose(normalised[changed], plain[changed] * 0.5 + 127.5, atol=1.0)
    assert_bad_input(invoke("report", out, "--mean", "0.5"), "--mean and --std go together")
    assert_bad_input(invoke("report", out, "--mean", "0.1,0.2", "--std", "0.5"), "mean has 2 values")

    shard = sorted((out / "shards").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:200])
    assert_bad_input(invoke("report", out), shard.name, "corrupt")


def test_help_lists_the_options():
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["explain-dataset", "--help"])
    assert result.exit_code == 0
    for option in ("--data", "--out", "--devices", "--top-k", "--method", "--target"):
        assert option in result.output
