"""The `peering` command line through its real entry point: Typer's runner and the installed console script.

One demo run on the scikit-learn digits (2 epochs) is made per module and its checkpoint is used by the
explain/morph tests; every bad-input case must end with one ``error:`` line, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import peering
from peering.checkpoints import CheckpointError, load_model
from peering.cli import app, read_image
from peering.data import load_digits
from peering.models import DigitCNN
from tests._close import assert_close

PEERING = Path(sys.executable).parent / "peering"

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_bad_input(result, *needles: str) -> None:
    """Exit code 2, exactly one line on stderr starting with ``error:`` and naming the problem."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".part")]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`peering demo` end to end on the digits with 2 epochs (progress bars on, as a user sees them)."""
    out = tmp_path_factory.mktemp("runs")
    result = invoke(
        "demo", "--out", out, "--name", "tiny", "--epochs", "2", "--track", "2", "--morph-digits", "2"
    )
    assert result.exit_code == 0, result.output
    return out / "tiny", result


@pytest.fixture(scope="module")
def checkpoint(demo_run) -> Path:
    return demo_run[0] / "model.ckpt"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Digit pictures in several formats: 8x8 grey PNG (the model's own size), 28x28 RGB JPEG, and more."""
    folder = tmp_path_factory.mktemp("images")
    x, y = load_digits()
    pixels = [(x[i, 0].numpy() * 255).round().astype(np.uint8) for i in range(4)]
    paths = {}
    for i in range(3):
        paths[f"digit{i}"] = folder / f"digit{i}_label{int(y[i])}.png"
        Image.fromarray(pixels[i]).save(paths[f"digit{i}"])
    paths["jpeg"] = folder / "big.jpg"
    Image.fromarray(pixels[3]).resize((28, 28), Image.Resampling.NEAREST).convert("RGB").save(paths["jpeg"])
    paths["corrupt"] = folder / "corrupt.png"
    paths["corrupt"].write_bytes(paths["digit0"].read_bytes()[:30])
    paths["text"] = folder / "notes.png"
    paths["text"].write_text("this is not an image\n")
    return paths


# ---------------------------------------------------------------------------------------------------- demo


def test_demo_writes_a_complete_run(demo_run):
    run_dir, result = demo_run
    for name in ("report.html", "model.ckpt", "run.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))
    strips = sorted((run_dir / "morph").glob("*.png"))
    gifs = sorted((run_dir / "morph").glob("*.gif"))
    assert len(strips) >= 2 and len(strips) == len(gifs)
    for strip in strips:
        with Image.open(strip) as im:
            assert im.width > 2 * im.height  # a row of frames
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["complete"] is True and summary["epochs"] == 2 and summary["dataset"] == "digits"
    assert summary["test_accuracy"] > 0.8
    kinds = {m["kind"].split(",")[0] for m in summary["morphs"]}
    assert "label + 1" in kinds
    for m in summary["morphs"]:
        if m["kind"] == "label + 1":
            assert m["target"] == (m["label"] + 1) % 10
    assert not temp_files(run_dir)
    # ends by saying where the report is and the exact TensorBoard command
    assert str(run_dir / "report.html") in result.stdout
    command = re.search(r"TensorBoard: (.+)", result.stdout).group(1).strip()
    assert command.split()[0].endswith("tensorboard") and "--logdir" in command
    assert Path(command.split("--logdir", 1)[1].strip()).resolve() == (run_dir / "logs").resolve()
    assert "Training the demo CNN" in result.stdout and "Morphing" in result.stdout
    # two judges trained on held-out digits the model never saw, asked about morphs and portraits
    judges = summary["judges"]
    assert judges["names"] == ["MLP", "LeNet"] and judges["trained_on"] > 100
    plain, default = judges["morphs"]
    assert plain["n"] == default["n"] > 100
    assert plain["success"] >= 0.95 and default["success"] >= 0.7  # 2 epochs: not often sure to 0.99
    for name in judges["names"]:  # the prior is what convinces them; noise of the same size does not
        assert default["agreement"][name] > plain["agreement"][name] + 0.3
        assert default["noise"][name] < 0.2
    assert (run_dir / judges["portraits"]["picture"]).is_file() and len(judges["portraits"]["classes"]) == 10
    assert "Training two judges" in result.stdout


def test_demo_run_is_readable_by_tensorboard_readers(demo_run):
    from peering.lightning import image_tags, read_images, read_index, read_scalars

    logs = demo_run[0] / "logs"
    tags = image_tags(logs)
    assert "peering/confused" in tags
    assert {"peering/tracked/0", "peering/tracked/1"} <= set(tags)
    assert len(read_scalars(logs, "val_acc")) == 2
    # the confusion atlas: a matrix at every validation epoch, in the event files
    matrices = read_images(logs, "peering/confusion_matrix")
    assert [len(pngs) for _, pngs in matrices] == [1, 1]
    records = [r for r in read_index(logs) if r["tag"] == "peering/confusion_matrix"]
    assert [(r["step"], r["epoch"]) for r in records] == [(step, e) for e, (step, _) in enumerate(matrices)]
    assert all(r["png"] is None for r in records)  # in TensorBoard, not in PNG files


def test_demo_rerun_replaces_the_previous_run(tmp_path):
    args = (
        "demo",
        "--out",
        tmp_path,
        "--name",
        "again",
        "--epochs",
        "1",
        "--track",
        "0",
        "--morph-digits",
        "1",
    )
    first = invoke(*args, "--no-progress")
    assert first.exit_code == 0, first.output
    stale = tmp_path / "again" / "morph" / "99_stale.png"
    stale.write_bytes(b"old")
    second = invoke(*args, "--no-progress", "--seed", "1")
    assert second.exit_code == 0, second.output
    assert not stale.exists()
    assert len(list((tmp_path / "again" / "logs").glob("events.out.tfevents.*"))) == 1
    assert json.loads((tmp_path / "again" / "run.json").read_text())["seed"] == 1


@pytest.mark.parametrize("stage", ["training", "morphing"])
def test_interrupted_demo_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, stage):
    run_dir = tmp_path / "cut"
    run_dir.mkdir()
    (run_dir / "report.html").write_text("<p>an earlier run</p>")  # must not survive as if it were this run
    (run_dir / "run.json").write_text("{}")
    if stage == "training":
        from peering.models import DigitClassifier

        original = DigitClassifier.training_step

        def interrupted(self, batch, batch_idx):
            if self.global_step == 3:
                raise KeyboardInterrupt
            return original(self, batch, batch_idx)

        monkeypatch.setattr(DigitClassifier, "training_step", interrupted)
    else:

        def interrupted_morph(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(peering, "morph", interrupted_morph)
    result = invoke("demo", "--out", tmp_path, "--name", "cut", "--epochs", "1", "--no-progress")
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr and "Traceback" not in result.output
    assert not (run_dir / "report.html").exists()
    assert not (run_dir / "run.json").exists()
    assert not temp_files(run_dir)
    if stage == "training":
        assert not (run_dir / "model.ckpt").exists()
    # Lightning ignores SIGINT while it shuts down; Ctrl+C must work again afterwards
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_a_real_process(tmp_path):
    """SIGINT to `peering demo` while it trains: exit code 130, a one-line message, no report."""
    if not PEERING.exists():
        pytest.skip(f"console script not installed at {PEERING} (pip install -e .)")
    process = subprocess.Popen(
        [str(PEERING), "demo", "--out", str(tmp_path), "--name", "ctrl-c", "--epochs", "200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
    )
    try:
        for line in process.stdout:
            if "Training the demo CNN" in line:
                break
        time.sleep(1.5)  # into the training loop
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            out, err = process.communicate(timeout=30)
            pytest.fail(f"peering demo did not stop after SIGINT; its threads:\n{err[-8000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    assert last == f"interrupted: {tmp_path / 'ctrl-c'} is incomplete (no report was written)"
    run_dir = tmp_path / "ctrl-c"
    assert not (run_dir / "report.html").exists() and not (run_dir / "run.json").exists()
    assert not (run_dir / "model.ckpt").exists()
    assert not temp_files(run_dir)


def test_demo_bad_arguments(tmp_path):
    assert_bad_input(invoke("demo", "--out", tmp_path, "--name", "a/b"), "name")
    empty = tmp_path / "no-mnist"
    empty.mkdir()
    (empty / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    (empty / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    result = invoke("demo", "--dataset", "mnist", "--data-dir", empty, "--out", tmp_path)
    assert_bad_input(result, "t10k-")


# ------------------------------------------------------------------------------------------ explain, morph


def test_explain_prints_probabilities_and_writes_the_picture(checkpoint, images, tmp_path):
    out = tmp_path / "explain.png"
    result = invoke("explain", checkpoint, images["digit0"], images["digit1"], images["jpeg"], "-o", out)
    assert result.exit_code == 0, result.output
    table = result.stdout
    for path in (images["digit0"], images["digit1"], images["jpeg"]):
        assert path.name in table
    rows = [ln for ln in table.splitlines() if ln.startswith(images["digit0"].name)]
    values = [float(v) for v in re.findall(r"\d\.\d\d", rows[0])[1:]]  # after "predicted k (p)"
    assert len(values) == 10 and abs(sum(values) - 1) < 0.03
    # the JPEG was converted to the model's 8x8 grey input, with a note
    assert re.search(r"note: .*big\.jpg: converted RGB to grey; resized 28x28 to 8x8", result.stderr)
    with Image.open(out) as picture:
        assert picture.mode == "RGB"
        assert picture.width >= 3 * 64 and picture.height >= 3 * 64  # 3 rows of input + 2 maps
    assert f"wrote {out}" in result.stdout


def test_explain_a_given_target_and_method(checkpoint, images, tmp_path):
    out = tmp_path / "target.png"
    result = invoke(
        "explain", checkpoint, images["digit0"], "--target", "3", "--method", "smoothgrad", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert "class 3" in result.stdout and out.is_file()


def test_morph_reports_the_flip_and_writes_strip_and_gif(checkpoint, images, tmp_path):
    model = load_model(checkpoint)
    image, _ = read_image(images["digit0"], 1, (8, 8))
    predicted = int(model.model(image[None]).argmax())
    target = (predicted + 1) % 10
    strip, gif = tmp_path / "strip.png", tmp_path / "morph.gif"
    # this model trained for 2 epochs only, and is not sure enough of anything for the default 0.99
    result = invoke("morph", checkpoint, images["digit0"], "--target", target, "--confidence", "0.9",
                    "--gif", gif, "-o", strip)
    assert result.exit_code == 0, result.output
    match = re.search(
        rf"reached p\({target}\) >= 0.9 at step (\d+): p\({target}\)=([\d.]+), l2 distance ([\d.]+)",
        result.stdout,
    )
    assert match, result.stdout
    assert int(match.group(1)) > 0 and float(match.group(3)) > 0 and float(match.group(2)) >= 0.9
    assert f"predicted {predicted}" in result.stdout
    assert re.search(r"note: data prior: 1,438 reference images, the training digits of .*tiny",
                     result.stderr)
    with Image.open(strip) as im:
        assert im.width > 3 * im.height
    with Image.open(gif) as im:
        assert 2 <= im.n_frames <= int(match.group(1)) + 1  # the steps up to the flip


def test_morph_within_a_budget_too_small_does_not_flip(checkpoint, images, tmp_path):
    model = load_model(checkpoint)
    image, _ = read_image(images["digit0"], 1, (8, 8))
    target = (int(model.model(image[None]).argmax()) + 1) % 10
    result = invoke(
        "morph",
        checkpoint,
        images["digit0"],
        "--target",
        target,
        "--budget",
        "0.01",
        "--steps",
        "20",
        "-o",
        tmp_path / "s.png",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert re.search(rf"did not reach p\({target}\) >= 0.99 in 20 steps \(budget 0.01\)", result.stdout), (
        result.stdout
    )
    distance = float(re.search(r"distance ([\d.]+)", result.stdout).group(1))
    assert distance <= 0.01 + 1e-6


def test_morph_reference_options(checkpoint, images, tmp_path):
    flip = invoke("morph", checkpoint, images["digit0"], "--target", "3", "--reference", "none",
                  "--confidence", "0", "-o", tmp_path / "a.png", "--no-progress")
    assert flip.exit_code == 0, flip.output
    assert "data prior" not in flip.stderr
    assert re.search(r"reached the top class 3 (at|already)", flip.stdout), flip.stdout
    sklearn = invoke("morph", checkpoint, images["digit0"], "--target", "3", "--reference", "digits",
                     "-o", tmp_path / "b.png", "--no-progress")
    assert sklearn.exit_code == 0, sklearn.output
    assert "note: data prior: 1,797 reference images, scikit-learn's digits" in sklearn.stderr
    lone = tmp_path / "lone" / "model.ckpt"  # a demo checkpoint moved away from its run.json
    lone.parent.mkdir()
    lone.write_bytes(Path(checkpoint).read_bytes())
    alone = invoke("morph", lone, images["digit0"], "-t", "3", "-o", tmp_path / "c.png", "--no-progress")
    assert alone.exit_code == 0, alone.output
    assert re.search(r"note: no run.json beside model.ckpt: morphing without a data prior", alone.stderr)


def test_portraits_from_a_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "portraits.png"
    result = invoke("portraits", checkpoint, "-o", out)
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith(("class", "p("))]
    rows = {words[0]: words[1:] for words in lines}
    assert rows["class"] == [str(k) for k in range(10)]
    assert len(rows["p(class)"]) == 10
    with Image.open(out) as im:
        assert im.width > 8 * im.height / 2  # ten portraits side by side
    blank = invoke("portraits", checkpoint, "--start", "blank", "--reference", "none",
                   "-o", tmp_path / "b.png")
    assert blank.exit_code == 0, blank.output
    no_data = invoke("portraits", checkpoint, "--reference", "none")
    assert_bad_input(no_data, "--start mean needs reference images")


def test_installed_console_script_runs(checkpoint, images, tmp_path):
    if not PEERING.exists():
        pytest.skip(f"console script not installed at {PEERING} (pip install -e .)")
    out = tmp_path / "sub.png"
    done = subprocess.run(
        [str(PEERING), "explain", str(checkpoint), str(images["digit2"]), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert images["digit2"].name in done.stdout and out.is_file()
    bad = subprocess.run(
        [str(PEERING), "morph", str(tmp_path / "missing.ckpt"), str(images["digit2"]), "--target", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'missing.ckpt'}"
    assert "Traceback" not in bad.stderr + bad.stdout


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, checkpoint):
    folder = tmp_path_factory.mktemp("bad")
    data = checkpoint.read_bytes()
    files = {
        "truncated": folder / "truncated.ckpt",
        "garbage": folder / "garbage.ckpt",
        "empty": folder / "empty.ckpt",
        "other_model": folder / "other_model.ckpt",
        "other_hparams": folder / "other_hparams.ckpt",
        "state_dict": folder / "weights.pt",
        "pickled": folder / "pickled.pt",
        "features": folder / "features.pt",
    }
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["garbage"].write_bytes(b"\x00garbage" * 100)
    files["empty"].write_bytes(b"")
    torch.save(
        {
            "state_dict": {"encoder.weight": torch.zeros(3, 3)},
            "hyper_parameters": {},
            "pytorch-lightning_version": "2.6.0",
        },
        files["other_model"],
    )
    torch.save(
        {
            "state_dict": {"encoder.weight": torch.zeros(3, 3)},
            "hyper_parameters": {"vocab": 3},
            "pytorch-lightning_version": "2.6.0",
        },
        files["other_hparams"],
    )
    torch.save(DigitCNN(image_size=8).state_dict(), files["state_dict"])
    torch.save(DigitCNN(image_size=8), files["pickled"])
    module = folder / "user_models.py"
    module.write_text(
        "import torch\n"
        "from torch import nn\n"
        "from peering.models import DigitCNN\n\n"
        "def cnn8():\n    return DigitCNN(image_size=8)\n\n"
        "def cnn28():\n    return DigitCNN(image_size=28)\n\n"
        "class Features(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(1, 4, 3)\n"
        "    def forward(self, x):\n        return self.conv(x)\n\n"
        "class Pair(Features):\n"
        "    def forward(self, x):\n        return self.conv(x).flatten(1), x\n\n"
        "def features():\n    return Features()\n\n"
        "def pair():\n    return Pair()\n\n"
        "def broken():\n    raise RuntimeError('no GPU here')\n\n"
        "def mlp():\n"
        "    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n\n"
        "class Normalised(DigitCNN):\n"
        "    # cnn8 for inputs normalised with mean 0.5 and std 0.25: the same function of the image\n"
        "    def forward(self, z):\n        return super().forward(z * 0.25 + 0.5)\n\n"
        "def normalised8():\n    return Normalised(image_size=8)\n"
    )
    files["module"] = module
    sys.path.insert(0, str(folder))
    import user_models

    torch.save(user_models.features().state_dict(), files["features"])
    files["mlp"] = folder / "mlp.pt"
    torch.save(user_models.mlp().state_dict(), files["mlp"])
    yield files
    sys.path.remove(str(folder))
    sys.modules.pop("user_models", None)


BAD_CHECKPOINTS = [
    ("missing", "checkpoint not found"),
    ("truncated", "truncated, corrupt or not a PyTorch checkpoint"),
    ("garbage", "not a PyTorch checkpoint"),
    ("empty", "is empty"),
    ("other_model", "checkpoint of another model"),
    ("other_hparams", "checkpoint of another model"),
    ("state_dict", "plain state_dict"),
    ("pickled", "cannot be loaded safely"),
]


@pytest.mark.parametrize("command", ["explain", "morph"])
@pytest.mark.parametrize(("kind", "message"), BAD_CHECKPOINTS, ids=[k for k, _ in BAD_CHECKPOINTS])
def test_bad_checkpoints(bad_files, images, tmp_path, command, kind, message):
    path = bad_files.get(kind, tmp_path / "missing.ckpt")
    extra = ["--target", "1"] if command == "morph" else []
    result = invoke(command, path, images["digit0"], *extra, "-o", tmp_path / "x.png")
    assert_bad_input(result, message, path.name)
    assert not (tmp_path / "x.png").exists()


BAD_MODELS = [
    ("user_models:cnn28", "state_dict", "do not fit"),
    ("user_models:features", "features", "does not return class scores"),
    ("user_models:pair", "features", "does not return class scores"),
    ("user_models:broken", "state_dict", "calling it failed"),
    ("user_models:nothing", "state_dict", "has no attribute"),
    ("no_such_module:factory", "state_dict", "cannot import no_such_module"),
    ("user_models", "state_dict", "package.module:factory"),
]


@pytest.mark.parametrize(("spec", "weights", "message"), BAD_MODELS, ids=[s for s, _, _ in BAD_MODELS])
def test_bad_user_models(bad_files, images, tmp_path, spec, weights, message):
    result = invoke(
        "explain",
        bad_files[weights],
        images["digit0"],
        "--model",
        spec,
        "--image-size",
        "8",
        "-o",
        tmp_path / "x.png",
    )
    assert_bad_input(result, message)


def test_user_model_with_a_state_dict(bad_files, images, tmp_path):
    out = tmp_path / "user.png"
    result = invoke(
        "explain", bad_files["state_dict"], images["digit0"], "--model", "user_models:cnn8", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert out.is_file()
    by_file = invoke(
        "explain",
        bad_files["state_dict"],
        images["digit0"],
        "--model",
        f"{bad_files['module']}:cnn8",
        "-o",
        out,
    )
    assert by_file.exit_code == 0, by_file.output


def test_flat_user_model(bad_files, images, tmp_path):
    """An MLP on 64 features: the CLI finds the 8x8 image size from its first layer and flattens."""
    out = tmp_path / "mlp.png"
    result = invoke(
        "explain", bad_files["mlp"], images["digit0"], images["jpeg"], "--model", "user_models:mlp", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert "resized 28x28 to 8x8" in result.stderr
    morph = invoke(
        "morph",
        bad_files["mlp"],
        images["digit0"],
        "--model",
        "user_models:mlp",
        "--target",
        "4",
        "-o",
        tmp_path / "mlp_strip.png",
        "--no-progress",
    )
    assert morph.exit_code == 0, morph.output


def test_normalised_model_with_mean_and_std(bad_files, images, tmp_path):
    """A model that takes (image - 0.5) / 0.25: with --mean/--std it sees what cnn8 sees of the raw image
    (same probabilities), its pictures show the image as read (no clamping note), and it morphs."""
    common = (bad_files["state_dict"], images["digit0"])

    def explain(factory: str, *extra: str) -> tuple[str, Image.Image]:
        out = tmp_path / f"{factory}{len(extra)}.png"
        result = invoke("explain", *common, "--model", f"user_models:{factory}", "-o", out, *extra)
        assert result.exit_code == 0, result.output
        table = [ln for ln in result.stdout.splitlines() if ln.startswith(images["digit0"].name)]
        with Image.open(out) as im:
            return table[0], im.copy()

    plain_table, plain = explain("cnn8")
    table, picture = explain("normalised8", "--mean", "0.5", "--std", "0.25")
    assert table == plain_table  # the model saw the same thing
    assert picture.size == plain.size  # no note: the image is shown as read, not clamped
    # the input tile (the left-most 96 px of the tiles) is the same as without any normalisation
    assert np.array_equal(np.array(picture)[-98:, :100], np.array(plain)[-98:, :100])
    raw_table, _ = explain("normalised8")  # without the options the model sees another input
    assert raw_table != plain_table
    norm = ("--mean", "0.5", "--std", "0.25")
    morph = invoke(
        "morph",
        *common,
        "--model",
        "user_models:normalised8",
        *norm,
        "--target",
        "4",
        "-o",
        tmp_path / "m.png",
        "--no-progress",
    )
    same = invoke(
        "morph",
        *common,
        "--model",
        "user_models:cnn8",
        "--target",
        "4",
        "-o",
        tmp_path / "p.png",
        "--no-progress",
    )
    assert morph.exit_code == 0 and same.exit_code == 0, morph.output + same.output
    assert morph.stdout.splitlines()[0] == same.stdout.splitlines()[0]  # "predicted k (p=...)" before
    assert (tmp_path / "m.png").is_file()
    assert_bad_input(
        invoke("explain", *common, "--model", "user_models:cnn8", "--mean", "0.5"),
        "--mean and --std go together",
    )
    assert_bad_input(
        invoke("explain", *common, "--model", "user_models:cnn8", "--mean", "0.5,0.5", "--std", "0.2"),
        "--mean has 2 values",
        "the images have 1 channel (give 1)",  # not "1 channels (give 1 or 1)"
    )


@pytest.mark.parametrize("target", ["10", "-1", "99"])
@pytest.mark.parametrize("command", ["explain", "morph"])
def test_target_out_of_range(checkpoint, images, tmp_path, command, target):
    result = invoke(command, checkpoint, images["digit0"], "--target", target, "-o", tmp_path / "x.png")
    assert_bad_input(result, f"target {target} is out of range", "10 classes")


@pytest.mark.parametrize("kind", ["corrupt", "text", "missing", "directory"])
@pytest.mark.parametrize("command", ["explain", "morph"])
def test_unreadable_images(checkpoint, images, tmp_path, command, kind):
    path = {"missing": tmp_path / "nope.png", "directory": tmp_path}.get(kind) or images[kind]
    extra = ["--target", "1"] if command == "morph" else []
    result = invoke(command, checkpoint, path, *extra, "-o", tmp_path / "x.png")
    assert_bad_input(result, str(path))


def test_unwritable_output(checkpoint, images, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("explain", checkpoint, images["digit0"], "-o", blocker / "sub" / "out.png")
    assert_bad_input(result, "cannot write", f"{blocker} is a file, not a folder")


def test_output_into_a_missing_folder_is_created_and_said(checkpoint, images, tmp_path):
    out = tmp_path / "new" / "deeper" / "x.png"
    result = invoke("explain", checkpoint, images["digit0"], "-o", out)
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert f"note: created folder {tmp_path / 'new'}" in result.stderr


VIT_FACTORY = """
from transformers import ViTConfig, ViTForImageClassification


def build():
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_labels=10)
    return ViTForImageClassification(config)
"""


def test_hugging_face_model_with_output_fn(images, tmp_path):
    """A ViT state_dict (its forward returns an ImageClassifierOutput): the error names --output-fn
    logits, which then works for explain and morph, run as the installed command."""
    pytest.importorskip("transformers")
    if not PEERING.exists():
        pytest.skip(f"console script not installed at {PEERING} (pip install -e .)")
    (tmp_path / "vit_model.py").write_text(VIT_FACTORY)
    from peering.checkpoints import import_factory

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(import_factory(f"{tmp_path / 'vit_model.py'}:build")().state_dict(), tmp_path / "vit.pt")
    model = ["--model", "vit_model.py:build", "--channels", "1", "--image-size", "8"]

    def run(*args):
        return subprocess.run(
            [str(PEERING), *map(str, args)], capture_output=True, text=True, cwd=tmp_path, timeout=300
        )

    bare = run("explain", "vit.pt", images["digit0"], *model)
    assert bare.returncode == 2 and "Traceback" not in bare.stderr, bare.stderr
    assert "ImageClassifierOutput" in bare.stderr and "--output-fn logits" in bare.stderr
    wrong = run("explain", "vit.pt", images["digit0"], *model, "--output-fn", "scores")
    assert wrong.returncode == 2 and "has no part 'scores'; it has: logits" in wrong.stderr, wrong.stderr
    done = run("explain", "vit.pt", images["digit0"], images["digit1"], *model, "--output-fn", "logits",
               "-o", "vit.png")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "vit.png").stat().st_size > 0 and images["digit1"].name in done.stdout
    morphed = run("morph", "vit.pt", images["digit0"], "--target", "3", "--steps", "5", *model,
                  "--output-fn", "logits", "--no-progress", "-o", "m.png")
    assert morphed.returncode == 0, morphed.stderr
    assert (tmp_path / "m.png").stat().st_size > 0


def test_report_command(demo_run, tmp_path):
    run_dir = demo_run[0]
    rebuilt = tmp_path / "again.html"
    result = invoke("report", run_dir, "-o", rebuilt)
    assert result.exit_code == 0, result.output
    assert rebuilt.is_file() and 'id="tracked"' in rebuilt.read_text()
    assert_bad_input(invoke("report", tmp_path / "nowhere"), "run folder not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_bad_input(invoke("report", empty), "holds no run")


# ------------------------------------------------------------------------------------------------ images


def test_read_image_conversions(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).save(tmp_path / "grey.png")
    x, notes = read_image(tmp_path / "grey.png", 1, (8, 8))
    assert notes == [] and x.shape == (1, 8, 8)
    assert_close(x[0], torch.from_numpy(grey / 255.0).float())

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[2:6, 3:5] = (0, 0, 0, 255)  # a black stroke on a transparent background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x, notes = read_image(tmp_path / "rgba.png", 1, (8, 8))
    assert "flattened transparency onto white" in notes
    assert float(x[0, 0, 0]) == 1.0 and float(x[0, 3, 3]) == 0.0
    x, notes = read_image(tmp_path / "rgba.png", 1, (8, 8), invert=True)
    assert float(x[0, 3, 3]) == 1.0 and "inverted" in notes

    sixteen = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(sixteen).save(tmp_path / "16bit.png")
    x, notes = read_image(tmp_path / "16bit.png", 1, None)
    assert any("8 bits" in n for n in notes) and 0.9 < float(x.max()) <= 1.0

    Image.fromarray(grey).save(tmp_path / "grey.jpg")
    x, notes = read_image(tmp_path / "grey.jpg", 3, (28, 28))
    assert x.shape == (3, 28, 28) and notes == ["converted grey to RGB", "resized 8x8 to 28x28"]


def test_load_model_api_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "none.ckpt")


def test_sigmoid_and_raw_heads_from_the_command_line(images, tmp_path):
    """--output sigmoid for a multi-label or single-logit model, --output raw for a regression; a softmax
    over one output is refused, naming both."""
    folder = tmp_path / "heads"
    folder.mkdir()
    (folder / "head_models.py").write_text(
        "from torch import nn\n\n"
        "def one():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1))\n\n"
        "def tags():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 4))\n"
    )
    sys.path.insert(0, str(folder))
    import head_models

    torch.manual_seed(0)
    weights = {name: folder / f"{name}.pt" for name in ("one", "tags")}
    for name, path in weights.items():
        torch.save(getattr(head_models, name)().state_dict(), path)

    def run(command, name, *extra):
        return invoke(command, weights[name], images["digit0"], "--model", f"head_models:{name}",
                      "-o", tmp_path / f"{command}_{name}{len(extra)}.png", *extra)

    assert_bad_input(run("explain", "one", "--top-k", "1"), "one output", "'sigmoid'", "'raw'")
    binary = run("explain", "one", "--top-k", "1", "--output", "sigmoid")
    assert binary.exit_code == 0, binary.output
    assert "class probabilities (sigmoid)" in binary.output and "gradient of the sigmoid" in binary.output
    regression = run("explain", "one", "--output", "raw")
    assert regression.exit_code == 0, regression.output
    assert "outputs" in regression.output and "largest" in regression.output
    tagged = run("morph", "tags", "--target", "2", "--output", "sigmoid", "--confidence", "0.6",
                 "--reference", "none", "--no-progress")
    assert tagged.exit_code == 0, tagged.output
    assert "σ(2)=" in tagged.output and "reached σ(2) >= 0.6" in tagged.output
