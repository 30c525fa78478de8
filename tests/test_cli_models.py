"""The command line takes a user's model as it was saved: a training-checkpoint dict, TorchScript, a
``torch.export`` archive, safetensors with ``--model``, a Hugging Face ``save_pretrained`` folder (image or
text, loaded offline with its own preprocessing). Every file is verified before use (one flipped bit is an
error naming the damaged record); the input size is read from the model, else the failing forward names
``--image-size``; images of other sizes are resized with a note; float TIFFs with NaN are refused, animated
GIFs noted, and a bad ``-o`` is refused before anything is computed."""

from __future__ import annotations

import struct
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_cli import assert_bad_input, invoke

pytestmark = pytest.mark.slow

USER_MODELS = """
import torch
from torch import nn

from peering.models import DigitCNN


def cnn8():
    return DigitCNN(image_size=8)


class Plain(nn.Module):
    \"\"\"Nothing on it says which image size it takes.\"\"\"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def plain():
    return Plain()
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits_cnn):
    """The trained digits CNN saved every way users save models, in one folder, with a few images."""
    folder = tmp_path_factory.mktemp("saved")
    (folder / "user_models.py").write_text(USER_MODELS)
    model = digits_cnn.eval()
    state = model.state_dict()
    torch.save({"epoch": 3, "model": state, "optimizer": {"lr": 0.1}}, folder / "train.pt")
    torch.save({"epoch": 3, "weights": state}, folder / "odd.pt")
    torch.jit.script(model).save(str(folder / "script.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 8, 8),)), str(folder / "model.pt2"))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        namespace: dict = {}
        exec(USER_MODELS, namespace)  # noqa: S102  # the module the command imports, to save its weights
        torch.save(namespace["plain"]().state_dict(), folder / "plain.pt")
    from peering.data import load_digits

    x, _ = load_digits()
    digit = (x[0, 0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(digit).save(folder / "digit.png")
    Image.fromarray(digit).resize((200, 200)).save(folder / "big.png")
    frames = [Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8)) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    nan = x[0, 0].numpy().astype(np.float32)
    nan[2, 3] = np.nan
    Image.fromarray(nan, mode="F").save(folder / "nan.tif")
    return folder


def explain(saved: Path, monkeypatch, *args):
    monkeypatch.chdir(saved)
    return invoke("explain", *args)


def predicted(result) -> int:
    """The class the command printed for the first input."""
    row = next(
        ln for ln in result.stdout.splitlines() if ln.split() and ln.split()[0].endswith((".png", ".gif"))
    )
    return int(row.split()[1])


def test_every_save_format_gives_the_models_own_prediction(saved, digits_cnn, monkeypatch, tmp_path):
    expected = int(
        digits_cnn(
            torch.from_numpy(np.asarray(Image.open(saved / "digit.png"), np.float32) / 255)[None, None]
        ).argmax()
    )
    runs = {
        "training dict": ("train.pt", "--model", "user_models.py:cnn8"),
        "safetensors": ("model.safetensors", "--model", "user_models.py:cnn8"),
        "TorchScript": ("script.pt",),
        "torch.export": ("model.pt2",),
    }
    for name, args in runs.items():
        out = tmp_path / f"{name}.png"
        result = explain(saved, monkeypatch, *args, "digit.png", "-o", out)
        assert result.exit_code == 0, (name, result.output)
        assert predicted(result) == expected, (name, result.stdout)
        assert out.stat().st_size > 0


def test_a_training_dict_without_weights_lists_its_keys(saved, monkeypatch, tmp_path):
    result = explain(
        saved, monkeypatch, "odd.pt", "digit.png", "--model", "user_models.py:cnn8", "-o", tmp_path / "x.png"
    )
    assert_bad_input(result, "holds no state_dict", "['epoch', 'weights']", "'model_state_dict'")


def test_safetensors_without_model_says_to_pass_it(saved, monkeypatch, tmp_path):
    result = explain(saved, monkeypatch, "model.safetensors", "digit.png", "-o", tmp_path / "x.png")
    assert_bad_input(result, "holds weights only", "--model")


def test_torchscript_reads_its_input_size_and_resizes_with_a_note(saved, monkeypatch, tmp_path):
    result = explain(saved, monkeypatch, "script.pt", "big.png", "-o", tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    assert "resized 200x200 to 8x8" in result.output


def test_an_unknown_input_size_names_image_size_once(saved, monkeypatch, tmp_path):
    args = ("plain.pt", "big.png", "--model", "user_models.py:plain", "-o", tmp_path / "x.png")
    assert_bad_input(explain(saved, monkeypatch, *args), "could not be read from the model", "--image-size")
    fixed = explain(saved, monkeypatch, *args, "--image-size", "28")
    assert fixed.exit_code == 0, fixed.output
    assert "resized 200x200 to 28x28" in fixed.output


def _flip_inside(path: Path, record_suffix: str) -> str:
    """Flip one bit in the data of the zip record whose name ends with ``record_suffix``; its name."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record_suffix) and i.file_size > 64)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 1
    path.write_bytes(bytes(data))
    return info.filename


@pytest.mark.parametrize("name", ["train.pt", "script.pt", "model.pt2"])
def test_one_flipped_bit_is_caught_before_use(saved, monkeypatch, tmp_path, name):
    damaged = tmp_path / name
    damaged.write_bytes((saved / name).read_bytes())
    record = _flip_inside(damaged, "/data/0" if name != "model.pt2" else "")
    model = ("--model", "user_models.py:cnn8") if name == "train.pt" else ()
    result = explain(saved, monkeypatch, damaged, "digit.png", *model, "-o", tmp_path / "x.png")
    assert_bad_input(result, "is damaged", repr(record), "CRC-32")
    assert not (tmp_path / "x.png").exists()


def test_a_damaged_safetensors_header_is_refused(saved, monkeypatch, tmp_path):
    damaged = tmp_path / "model.safetensors"
    data = (saved / "model.safetensors").read_bytes()
    damaged.write_bytes(data[:-4])  # the last tensor loses bytes
    result = explain(
        saved, monkeypatch, damaged, "digit.png", "--model", "user_models.py:cnn8", "-o", tmp_path / "x.png"
    )
    assert_bad_input(result, "safetensors file", "damaged")


def test_images_that_cannot_be_pixels_and_animations(saved, monkeypatch, tmp_path):
    model = ("--model", "user_models.py:cnn8")
    nan = explain(saved, monkeypatch, "train.pt", "nan.tif", *model, "-o", tmp_path / "x.png")
    assert_bad_input(nan, "nan.tif", "NaN or Inf")
    assert "RuntimeWarning" not in nan.output
    gif = explain(saved, monkeypatch, "train.pt", "anim.gif", *model, "-o", tmp_path / "x.png")
    assert gif.exit_code == 0, gif.output
    assert "an animated image of 3 frames: read its first frame" in gif.output


def test_a_bad_output_is_refused_before_loading_anything(saved, monkeypatch, tmp_path):
    """-o a folder, or under a file: refused even with a checkpoint that does not exist (nothing ran)."""
    folder = explain(saved, monkeypatch, "missing.pt", "digit.png", "-o", tmp_path)
    assert_bad_input(folder, "it is a folder")
    blocked = explain(saved, monkeypatch, "missing.pt", "digit.png", "-o", saved / "digit.png" / "x.png")
    assert_bad_input(blocked, "is a file, not a folder")


# ------------------------------------------------------------------------------------------ Hugging Face

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "fine", "film", "dull", "plot", "the", "was"]


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = transformers.ViTForImageClassification(
            transformers.ViTConfig(
                image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=64, num_labels=3,
                id2label={0: "cat", 1: "dog", 2: "owl"}, label2id={"cat": 0, "dog": 1, "owl": 2},
            )
        )  # fmt: skip
        bert = transformers.BertForSequenceClassification(
            transformers.BertConfig(
                vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=32, num_labels=2,
                id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
            )
        )  # fmt: skip
    vit.save_pretrained(folder / "vit")
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder / "vit")
    bert.save_pretrained(folder / "bert")
    vocab = {word: i for i, word in enumerate(VOCAB)}
    transformers.BertTokenizerFast(vocab=vocab).save_pretrained(folder / "bert")
    Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8)).save(
        folder / "pet.png"
    )
    (folder / "review.txt").write_text("the film was dull\n")
    return folder


def test_hugging_face_image_folder(hf_folders, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("explain", hf_folders / "vit", hf_folders / "pet.png", "-o", tmp_path / "vit.png")
    assert result.exit_code == 0, result.output
    assert "resized 30x40 to 16x16" in result.output  # width x height
    assert "cat" in result.stdout and "owl" in result.stdout  # the config's class names
    assert (tmp_path / "vit.png").stat().st_size > 0
    extra = invoke(
        "explain", hf_folders / "vit", hf_folders / "pet.png", "--model", "m:f", "-o", tmp_path / "x.png"
    )
    assert_bad_input(extra, "Hugging Face folder", "--model")


def test_hugging_face_text_folder_with_text_and_a_text_file(hf_folders, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "bert.png"
    result = invoke(
        "explain", hf_folders / "bert", hf_folders / "review.txt", "--text", "a fine film", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert "review.txt" in result.stdout and "a fine film" in result.stdout
    assert "input_x_gradient" in result.stdout and out.stat().st_size > 0
    assert "negative" in result.stdout and "positive" in result.stdout  # the config's class names
    from peering.checkpoints import load_model

    tokenizer = load_model(hf_folders / "bert").tokenizer  # the folder's own: the words are known
    assert tokenizer.unk_token_id not in tokenizer("the film was dull")["input_ids"]
    images = invoke("explain", hf_folders / "bert", "--text", "a", "--model", "m:f", "-o", tmp_path / "x.png")
    assert images.exit_code == 2
    on_images = invoke(
        "morph", hf_folders / "bert", hf_folders / "pet.png", "--target", "1", "-o", tmp_path / "m.png"
    )
    assert_bad_input(on_images, "text classifier")


def test_a_damaged_hugging_face_folder_is_refused(hf_folders, monkeypatch, tmp_path):
    import shutil

    copy = tmp_path / "vit"
    shutil.copytree(hf_folders / "vit", copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    result = invoke("explain", copy, hf_folders / "pet.png", "-o", tmp_path / "x.png")
    assert_bad_input(result, "model.safetensors", "damaged")
    assert sys.modules.get("peering") is not None
