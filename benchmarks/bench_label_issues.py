"""Wrong labels found during training: `LabelIssues` (one training) against cleanlab's `find_label_issues`
with 5-fold cross-validated probabilities (5 trainings) and with the in-sample probabilities of the same
one training (equal cost).

    OMP_WAIT_POLICY=PASSIVE PEERING_DATA_DIR=../shared/datasets/mnist python benchmarks/bench_label_issues.py

Data: MNIST t10k digits 0-7,999, two kinds of seeded label noise:

- uniform: 10% of the labels flipped to a random other class;
- structured: 40% of the 7s, 4s, 3s, 2s and 9s labelled 1, 9, 5, 7 and 4 (about 20% of all labels), as
  annotators confuse them.

Model: the demo's `DigitClassifier` (`DigitCNN`: two convolutions, dropout, Adam 1e-3), batch 64,
``--epochs`` (default 4), trained by a Lightning `Trainer` on ``(image, label, index)`` batches; the same
settings for every training. Its ``training_step`` returns ``{"loss", "logits"}`` so that
``logits="step"`` has the step's logits.

Contenders, each scored by AUROC (flipped vs clean) and precision at the number of flips:

- `LabelIssues` variants, all attached to ONE training (they do not change it: the weights are
  bit-identical with and without them): the default (``score="distance"``: the calibrated margin over the
  norm of its input gradient, from an eval-mode pass before each step, burn-in 1), the calibrated margin
  alone, Pleiss et al.'s plain AUM on eval-mode logits, and on the step's own logits (as in the paper);
- cleanlab on the in-sample probabilities of that same training's final model (eval mode): equal cost;
- cleanlab on 5-fold cross-validated probabilities: 5 more trainings of the same model, each on 4/5
  (``--no-cv`` leaves them out: on 2 busy CPU cores they take most of the run's time).

cleanlab's score is `cleanlab.rank.get_label_quality_scores` (self-confidence, the order
`find_label_issues` ranks by; normalized margin is also shown); `find_label_issues` (prune by noise rate)
is also run for its own flagged set (size, precision, recall). The time each variant's hooks took is
shown as a share of the training time without them.

Goals (issue 21): uniform AUROC >= 0.99; structured >= 0.95; in both >= cleanlab at equal cost and within
0.01 of cleanlab with 5x the training.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from _common import parse_args  # the script's own folder is on sys.path
from peering.data import load_mnist
from peering.lightning import LabelIssues
from peering.models import DigitClassifier

PAIRS = {7: 1, 4: 9, 3: 5, 2: 7, 9: 4}
VARIANTS = {
    "LabelIssues() [default: distance, eval pass, calibrated, burn-in 1]": {},
    "  score='margin' (calibrated margin, eval logits)": {"score": "margin"},
    "  score='margin', logits='step', calibrate=False, burn_in=0 (AUM as in the paper)": {
        "score": "margin", "logits": "step", "calibrate": False, "burn_in": 0},
}


def uniform_flips(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = int(round(fraction * len(y)))
    idx = torch.randperm(len(y), generator=g)[:k]
    noisy = y.clone()
    noisy[idx] = (y[idx] + torch.randint(1, 10, (k,), generator=g)) % 10
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[idx] = True
    return noisy, flipped


def structured_flips(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    noisy, flipped = y.clone(), torch.zeros(len(y), dtype=torch.bool)
    for a, b in PAIRS.items():
        idx = (y == a).nonzero().flatten()
        pick = idx[torch.randperm(len(idx), generator=g)[: int(round(fraction * len(idx)))]]
        noisy[pick], flipped[pick] = b, True
    return noisy, flipped


class Indexed(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor):
        self.x, self.y, self.index = x, y, index

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], int(self.index[i])


class Classifier(DigitClassifier):
    """The demo classifier on (image, label, index) batches; the training step returns its logits too."""

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits.detach()}


class Timed(LabelIssues):
    """LabelIssues that adds up the seconds its training hooks take."""

    seconds = 0.0

    def on_train_batch_start(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_train_batch_start(*args, **kwargs)
        self.seconds += time.perf_counter() - start

    def on_train_batch_end(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        self.seconds += time.perf_counter() - start

    def on_train_epoch_end(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_train_epoch_end(*args, **kwargs)
        self.seconds += time.perf_counter() - start


def train(x, y, index, epochs: int, seed: int, callbacks=(), root: str = "/tmp") -> tuple[Classifier, float]:
    pl.seed_everything(seed, verbose=False)
    model = Classifier()
    loader = DataLoader(Indexed(x, y, index), batch_size=64, shuffle=True)
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks), default_root_dir=root, deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    return model, time.perf_counter() - start


@torch.no_grad()
def probabilities(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[s : s + 500]).softmax(1) for s in range(0, len(x), 500)]).double().numpy()


def auroc_and_precision(suspicion: np.ndarray, flipped: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    n = int(flipped.sum())
    top = np.argsort(-suspicion, kind="stable")[:n]
    return float(roc_auc_score(flipped, suspicion)), float(flipped[top].mean())


def cleanlab_rows(name: str, labels: np.ndarray, probs: np.ndarray, flipped: np.ndarray) -> dict[str, dict]:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = probs / probs.sum(1, keepdims=True)
    rows = {}
    for method in ("self_confidence", "normalized_margin"):
        quality = get_label_quality_scores(labels, probs, method=method)
        auroc, precision = auroc_and_precision(-quality, flipped)
        rows[f"{name}, {method}"] = {"auroc": auroc, "precision": precision}
    mask = find_label_issues(labels, probs)
    rows[f"{name}, self_confidence"]["flagged"] = {
        "n": int(mask.sum()),
        "precision": float(flipped[mask].mean()) if mask.any() else float("nan"),
        "recall": float(flipped[mask].sum() / flipped.sum()),
    }
    return rows


def run_noise(kind: str, x, y_true, noisy, flipped, args) -> dict[str, dict]:
    n = len(noisy)
    index = torch.arange(n)
    results: dict[str, dict] = {}
    share = 100 * flipped.float().mean()
    print(f"\n== {kind}: {int(flipped.sum())} of {n} labels flipped ({share:.1f}%)", flush=True)
    # one training with every LabelIssues variant attached, one without (for the time shares)
    callbacks = {name: Timed(pictures=False, write=False, **options) for name, options in VARIANTS.items()}
    model, seconds = train(x, noisy, index, args.epochs, args.seed, callbacks.values())
    hooks = sum(cb.seconds for cb in callbacks.values())
    training = seconds - hooks
    fl = flipped.numpy()
    for name, cb in callbacks.items():
        indices, scores = cb.ranking()
        suspicion = np.empty(n)
        suspicion[indices.numpy()] = -scores.numpy()
        auroc, precision = auroc_and_precision(suspicion, fl)
        results[name] = {"auroc": auroc, "precision": precision, "time_share": cb.seconds / training}
    in_sample = probabilities(model, x)
    results.update(cleanlab_rows("cleanlab, in-sample (same training)", noisy.numpy(), in_sample, fl))
    results["_training_seconds"] = {"seconds": training}
    if not args.cv:
        return results
    # 5-fold cross-validation: 5 more trainings
    g = torch.Generator().manual_seed(args.seed + 1)
    folds = torch.randperm(n, generator=g).chunk(5)
    out_of_sample = np.zeros((n, 10))
    for k, held in enumerate(folds):
        keep = torch.cat([f for j, f in enumerate(folds) if j != k])
        fold_model, _ = train(x[keep], noisy[keep], keep, args.epochs, args.seed + 10 + k)
        out_of_sample[held.numpy()] = probabilities(fold_model, x[held])
        print(f"  fold {k + 1}/5 trained", flush=True)
    name = "cleanlab, 5-fold cross-validated (5 trainings)"
    results.update(cleanlab_rows(name, noisy.numpy(), out_of_sample, fl))
    return results


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=8000, help="the first N digits (8000: the benchmark)")
    parser.add_argument("--noise", nargs="+", default=["uniform", "structured"])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--cv", action=argparse.BooleanOptionalAction, default=True,
                        help="also run cleanlab on 5-fold cross-validated probabilities (5 more trainings)")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=None, threads=1, options=_options)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    images, labels = load_mnist(args.data_dir, "test")
    x, y = images[: args.samples], labels[: args.samples]
    every = {}
    for kind in args.noise:
        make = uniform_flips if kind == "uniform" else structured_flips
        noisy, flipped = make(y, 0.1 if kind == "uniform" else 0.4, args.seed)
        every[kind] = run_noise(kind, x, y, noisy, flipped, args)
        print(f"\n{kind} noise, {args.epochs} epochs, seed {args.seed}: AUROC, precision at the number of "
              "flips")
        for name, row in every[kind].items():
            if name.startswith("_"):
                continue
            extra = f"   hooks: {100 * row['time_share']:.0f}% of the training" if "time_share" in row else ""
            if "flagged" in row:
                f = row["flagged"]
                extra = (f"   find_label_issues flags {f['n']}: precision {f['precision']:.3f}, "
                         f"recall {f['recall']:.3f}")
            print(f"  {name:84s} {row['auroc']:.4f}  {row['precision']:.3f}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(every, indent=1))


if __name__ == "__main__":
    main()
