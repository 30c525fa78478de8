"""`ConfusedLogitCallback` on models people bring: a `torch.compile`d network (compiled whole, as a
submodule, and the LightningModule itself) and a Hugging Face BERT fed dict batches with padded attention
masks, explained at its word embeddings (``layer=``).

Each test records what the callback explained (a subclass of the callback keeps the samples, their
forward arguments and the attributions) and checks it against `peering.explain` on an eager model with the
same weights, so the pictures rest on the eager model's numbers with each sample's own mask.
"""

from __future__ import annotations

import copy
import io
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from peering import explain
from peering.data import load_digits
from peering.lightning import ConfusedLogitCallback, read_images, read_index
from peering.render import token_panels
from peering.render._draw import _lut_np
from peering.report import build_report
from tests._chromium import evaluate, find_chromium
from tests._close import assert_close

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
ALWAYS = {"max_logit_difference": 1e9, "min_logit_value": None}  # every sample counts as confused


def peering_warnings(records) -> list[str]:
    return [str(w.message) for w in records if "peering" in str(w.message)]


class Recording(ConfusedLogitCallback):
    """Keeps, for every explanation it makes, the samples, their forward arguments, the attributions and
    the module's weights at that moment (compiled wrappers' ``_orig_mod.`` prefixes removed)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls: list[dict] = []

    def _explain(self, pl_module, chosen):
        attributions, probs = super()._explain(pl_module, chosen)
        state = {k.replace("_orig_mod.", ""): v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.calls.append(
            {
                "inputs": chosen.inputs.clone(),
                "classes": chosen.classes.clone(),
                "kwargs": {k: v.clone() for k, v in chosen.forward.per_sample.items()},
                "attributions": attributions.detach().clone(),
                "probs": probs.detach().clone(),
                "state": state,
            }
        )
        return attributions, probs


# ---------------------------------------------------------------------------------------- compiled models


def batch_norm_cnn() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )


class DigitNet(pl.LightningModule):
    """The batch-norm CNN on 8x8 digits; ``compiled``: "network" (``self.net`` compiled whole),
    "submodule" (its second convolution compiled) or "" (eager)."""

    def __init__(self, compiled: str = ""):
        super().__init__()
        net = batch_norm_cnn()
        if compiled == "network":
            net = torch.compile(net, backend="aot_eager")
        elif compiled == "submodule":
            net[4] = torch.compile(net[4], backend="aot_eager")
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.fixture(scope="module")
def digit_loaders():
    x, y = load_digits()
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16)
    val = DataLoader(TensorDataset(x[64:96], y[64:96]), batch_size=16)
    return train, val


@pytest.mark.slow
@pytest.mark.parametrize("compiled", ["network", "submodule", "lightning_module"])
def test_compiled_models_get_pictures_of_the_eager_numbers(digit_loaders, tmp_path, compiled):
    """Training through compiled graphs (aot_autograd, whose backward refuses a retained graph), the callback
    still draws, and what it explains (K=2 classes, top_k=6 samples a check) is the eager model's
    explanation with the weights of that moment."""
    train, val = digit_loaders
    module = DigitNet("" if compiled == "lightning_module" else compiled)
    fitted = torch.compile(module, backend="aot_eager") if compiled == "lightning_module" else module
    callback = Recording(top_k=6, logging_batch_interval=2, background=False, **ALWAYS)
    trainer = pl.Trainer(max_epochs=1, logger=False, default_root_dir=tmp_path, callbacks=[callback], **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(fitted, train, val)
    assert peering_warnings(caught) == []
    state = callback.state_dict()
    assert state["pictures"] == {"train": 12, "validation": 6, "test": 0}  # checks at batches 1 and 3
    assert [len(pngs) for _, pngs in read_images(tmp_path, "peering/confused")] == [6, 6]
    assert len([r for r in read_index(tmp_path) if "label" in r]) == 18  # and the confusion atlas's

    eager = DigitNet()
    assert len(callback.calls) == 3
    for call in callback.calls:
        eager.load_state_dict(call["state"])
        ref = explain(eager, call["inputs"], call["classes"], output="logit")  # the callback's default
        assert ref.attributions.abs().amax() > 0
        assert_close(call["attributions"], ref.attributions)
        assert_close(call["probs"], ref.probabilities.gather(1, call["classes"]))


# ---------------------------------------------------------------------------------------- Hugging Face BERT

L = 12  # tokens per sample, padded


class Tokens(Dataset):
    """A synthetic token task: label 1 when token 7 occurs among a sample's real tokens. Samples have
    3-12 real tokens (1 = [CLS] first) and are padded with 0 to 12, with their attention mask."""

    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, L + 1, (n,), generator=gen)
        self.mask = (torch.arange(L)[None] < lengths[:, None]).long()
        ids = torch.randint(2, 12, (n, L), generator=gen)
        ids[:, 0] = 1
        self.ids = ids * self.mask
        self.labels = ((self.ids == 7).any(dim=1)).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TextClassifier(pl.LightningModule):
    """A tiny BERT (random weights, nothing downloaded) trained on dict batches."""

    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=2,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = transformers.BertForSequenceClassification(config)

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    @staticmethod
    def _named(batch):
        if isinstance(batch, (tuple, list)):  # the custom collate's (input_ids, attention_mask, labels)
            return dict(zip(("input_ids", "attention_mask", "labels"), batch, strict=True))
        return batch

    def training_step(self, batch, batch_idx):
        return self.model(**self._named(batch)).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**self._named(batch)).loss)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _as_tuples(items):
    """Collate into (input_ids, attention_mask, labels) tuples, for a custom unpack."""
    return tuple(torch.stack([item[k] for item in items]) for k in ("input_ids", "attention_mask", "labels"))


@pytest.mark.slow
@pytest.mark.parametrize("batches", ["hf_dicts", "custom_unpack"])
def test_bert_with_padded_masks_logs_pictures_at_the_embeddings(tmp_path, batches):
    pytest.importorskip("transformers")
    train_set, val_set = Tokens(96, seed=0), Tokens(48, seed=1)
    collate, unpack = (None, None)
    if batches == "custom_unpack":
        collate, unpack = _as_tuples, (lambda b: (b[0], b[2], {"attention_mask": b[1]}))
    train = DataLoader(train_set, batch_size=16, collate_fn=collate)
    val = DataLoader(val_set, batch_size=48, collate_fn=collate)
    module = TextClassifier()
    callback = Recording(
        top_k=4,
        logging_batch_interval=2,
        layer=module.model.bert.embeddings.word_embeddings,
        output_fn=lambda out: out.logits,
        unpack=unpack,
        background=False,
        **ALWAYS,
    )
    trainer = pl.Trainer(max_epochs=1, logger=False, default_root_dir=tmp_path, callbacks=[callback], **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train, val)
    assert peering_warnings(caught) == []
    assert callback.state_dict()["pictures"] == {"train": 12, "validation": 4, "test": 0}
    assert [len(pngs) for _, pngs in read_images(tmp_path, "peering/confused")] == [4, 4, 4]
    assert [len(pngs) for _, pngs in read_images(tmp_path, "peering/val/confused")] == [4]

    # every explained sample came with its own mask row, and the explanation is the one explain() gives
    # with those masks at the word embeddings
    all_ids = torch.cat([train_set.ids, val_set.ids])
    all_masks = torch.cat([train_set.mask, val_set.mask])
    eager = TextClassifier()
    layer = eager.model.bert.embeddings.word_embeddings
    for call in callback.calls:
        ids, mask = call["inputs"], call["kwargs"]["attention_mask"]
        rows = (ids[:, None, :] == all_ids[None]).all(dim=2).float().argmax(dim=1)
        assert torch.equal(all_ids[rows], ids)
        assert torch.equal(mask, all_masks[rows])
        assert mask.sum(dim=1).min() < L  # padded samples among them
        eager.load_state_dict(call["state"])
        ref = explain(
            eager,
            ids,
            call["classes"],
            method="input_x_gradient",  # the callback's default with layer=
            forward_kwargs={"attention_mask": mask},
            layer=layer,
            output="logit",
            output_fn=lambda out: out.logits,
        )
        assert call["attributions"].shape == (len(ids), 2, L, 32)
        assert_close(call["attributions"], ref.attributions)
        unmasked = explain(
            eager,
            ids,
            call["classes"],
            method="input_x_gradient",
            layer=layer,
            output="logit",
            output_fn=lambda out: out.logits,
        )
        assert not torch.allclose(unmasked.attributions, ref.attributions)  # the masks mattered


WORDS = ["the", "film", "was", "not", "good", "##ly", "plot", "acting", "dull", "fun"]  # ids 2..11


def word_tokenizer(folder: Path):
    """A real Hugging Face WordPiece tokenizer over the synthetic task's vocabulary (written to a file:
    nothing downloaded): [PAD] = 0, [CLS] = 1, the words 2..11 (7 is "##ly"), then fillers up to 99."""
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[CLS]", *WORDS, "[SEP]", "[UNK]", "[MASK]"]
    vocab += [f"w{i}" for i in range(len(vocab), 100)]
    path = folder / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizer(str(path))


ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.mark.slow
def test_text_pictures_are_coloured_tokens_and_the_report_shows_them_as_html(tmp_path):
    """With token ids explained at the word embeddings and a tokenizer, each picture is the sample's words
    coloured toward its two classes (padding left out); the index keeps the words and their scores (the
    input x gradient summed over the embedding), and the report draws them as HTML text in Chromium."""
    tokenizer = word_tokenizer(tmp_path)
    train = DataLoader(Tokens(64, seed=0), batch_size=16)
    module = TextClassifier()
    callback = Recording(
        top_k=3,
        logging_batch_interval=2,
        layer="model.bert.embeddings.word_embeddings",
        output_fn=lambda out: out.logits,
        tokenizer=tokenizer,
        atlas=False,
        background=False,
        **ALWAYS,
    )
    assert callback.method == "input_x_gradient"
    trainer = pl.Trainer(max_epochs=1, logger=False, default_root_dir=tmp_path, callbacks=[callback], **QUIET)
    trainer.fit(module, train)
    assert callback.state_dict()["pictures"]["train"] == 6 and len(callback.calls) == 2

    records = [r for r in read_index(tmp_path) if r.get("tag") == "peering/confused"]
    pictures = [png for _, pngs in read_images(tmp_path, "peering/confused") for png in pngs]
    assert len(records) == len(pictures) == 6
    k = 0
    for call in callback.calls:
        ids, mask, attributions = call["inputs"], call["kwargs"]["attention_mask"], call["attributions"]
        scores = attributions.sum(dim=-1)  # [n, 2, L]: each token's signed contribution
        drawn = token_panels(
            scores,
            ids,
            class_a=call["classes"][:, 0],
            class_b=call["classes"][:, 1],
            prob_a=call["probs"][:, 0],
            prob_b=call["probs"][:, 1],
            labels=(ids == 7).any(dim=1).long(),
            tokenizer=tokenizer,
            mask=mask,
            output="logit",
            method=callback.method,
        )
        for i in range(len(ids)):
            record, kept = records[k], mask[i].bool()
            assert record["tokens"] == tokenizer.convert_ids_to_tokens(ids[i][kept].tolist())
            assert record["tokens"][0] == "[CLS]" and "[PAD]" not in record["tokens"]
            assert_close(torch.tensor(record["scores"]), scores[i][:, kept], rtol=1e-3)
            with Image.open(io.BytesIO(pictures[k])) as png:
                assert torch.equal(torch.from_numpy(np.array(png.convert("RGB"))), drawn[i])
            k += 1

    report = build_report(tmp_path)
    html = report.read_text(encoding="utf-8")
    assert html.count('class="peering-tokens"') == 2 * 6  # two classes per sample, as HTML text
    assert "<img" not in html.split('id="confused"')[1].split("</section>")[0]
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not found: install Debian's chromium package (`apt-get install chromium`)")
    ARTIFACTS.mkdir(exist_ok=True)
    seen = evaluate(
        binary,
        report.as_uri(),
        """(() => {
          const blocks = document.querySelectorAll('#confused .peering-tokens');
          if (!blocks.length) return "";
          const spans = [...blocks[0].querySelectorAll('span')];
          return JSON.stringify({blocks: blocks.length,
            words: spans.map(s => s.textContent),
            colours: spans.map(s => getComputedStyle(s).backgroundColor),
            visible: spans.every(s => s.getBoundingClientRect().width > 0)});
        })()""",
        tmp_path / "profile",
        screenshot=ARTIFACTS / "report-tokens.png",
    )
    assert seen is not None, "the report's token text never showed in chromium"
    assert seen["blocks"] == 12 and seen["visible"]
    first = records[min(range(6), key=lambda j: records[j]["margin"])]  # the report's first: most confused
    words = [t[2:] if t.startswith("##") else t for t in first["tokens"]]
    assert seen["words"] == words
    # the strongest token toward class a is drawn at the end of the colour table (bright or dark), the
    # others in between: the colours follow the scores
    values = first["scores"][0]
    strongest = max(range(len(values)), key=lambda j: abs(values[j]))
    rgb = [tuple(int(v) for v in re.findall(r"\d+", c)[:3]) for c in seen["colours"]]
    end = _lut_np()[255 if values[strongest] > 0 else 0]
    assert rgb[strongest] == tuple(int(v) for v in end)


@pytest.mark.slow
def test_token_ids_without_layer_are_refused_with_a_hint(tmp_path):
    """Integer token ids without ``layer=``: one warning naming layer=, training goes on."""
    pytest.importorskip("transformers")
    train = DataLoader(Tokens(32, seed=0), batch_size=16)
    callback = ConfusedLogitCallback(logging_batch_interval=1, output_fn=lambda out: out.logits, **ALWAYS)
    trainer = pl.Trainer(max_epochs=1, logger=False, default_root_dir=tmp_path, callbacks=[callback], **QUIET)
    before = copy.deepcopy(TextClassifier().state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = TextClassifier()
        trainer.fit(module, train)
    said = peering_warnings(caught)
    assert len(said) == 1 and "layer=" in said[0]
    assert trainer.state.finished and any(
        not torch.equal(before[k], v) for k, v in module.state_dict().items()
    )


def _padded_to_longest(items):
    """Pad each batch only to its own longest sample, as a tokenizer's dynamic padding does."""
    longest = max(int(item["attention_mask"].sum()) for item in items)
    return {
        "input_ids": torch.stack([item["input_ids"][:longest] for item in items]),
        "attention_mask": torch.stack([item["attention_mask"][:longest] for item in items]),
        "labels": torch.stack([item["labels"] for item in items]),
    }


@pytest.mark.slow
def test_validation_batches_of_other_lengths_are_skipped_with_one_warning(tmp_path):
    """Dynamic padding: validation batches of different lengths cannot share one pool of candidates. The
    callback keeps the batches shaped like the first, says so once, and still draws their samples."""
    pytest.importorskip("transformers")
    data = Tokens(48, seed=3)
    val = DataLoader(data, batch_size=8, collate_fn=_padded_to_longest)
    lengths = [batch["input_ids"].shape[1] for batch in val]
    assert len(set(lengths)) > 1
    module = TextClassifier()
    callback = ConfusedLogitCallback(
        top_k=2,
        logging_batch_interval=1,
        layer="model.bert.embeddings.word_embeddings",
        output_fn=lambda out: out.logits,
        **ALWAYS,
    )
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path, callbacks=[callback], **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(module, val)
    said = peering_warnings(caught)
    assert len(said) == 1 and "shaped unlike the first" in said[0] and "padding='max_length'" in said[0]
    state = callback.state_dict()
    assert state["checks"]["validation"] == sum(n == lengths[0] for n in lengths)
    assert state["pictures"]["validation"] == 2
