"""Shortcuts caught during training: `ShortcutAlarm` on MNIST trainings where one class's training images
carry a white patch, and on the same trainings without it.

    OMP_WAIT_POLICY=PASSIVE PEERING_DATA_DIR=../shared/datasets/mnist python benchmarks/bench_shortcuts.py

Data: MNIST t10k digits 0-7,999 to train on (the demo's `DigitClassifier`, batch 64, ``--epochs``, default
3, validated on digits 8,000-8,999 each epoch); the probe is 50 clean digits per class from 9,000-9,999
(never trained on, never patched). A configuration puts a white (1.0) square of ``size`` pixels at
``place`` on the training images of one class (``corr``: the fraction of that class's images that carry
it; never any other class's). For each configuration the table shows:

- how strong the shortcut is, measured directly: after the last epoch, the probe accuracy and the share of
  the other classes' probe digits that the patch alone turns into the class ("fooled");
- the epoch (counted from 1) of the first alarm naming the class ("caught"), or "missed";
- the other classes named by an alarm ("false alarms"); for clean trainings every alarm is one;
- the largest quiet-patch share of the class and of the others, per epoch (the statistic the alarm
  thresholds: ``min_share`` 1.5%, ``min_ratio`` 3).

Goal (issue 21): a 4x4 corner patch on every training 3 is named within 3 epochs; the same training
without the patch raises no alarm. The per-epoch statistics are written with ``--json`` so that other
thresholds can be judged without training again.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from _common import parse_args  # the script's own folder is on sys.path
from peering.data import load_mnist
from peering.lightning import ShortcutAlarm
from peering.models import DigitClassifier

# name: (class, (row, column), size, fraction of the class's training images, seed); class None: clean
CONFIGS: dict[str, tuple[int | None, tuple[int, int], int, float, int]] = {
    "clean, seed 0": (None, (0, 0), 0, 0.0, 0),
    "clean, seed 1": (None, (0, 0), 0, 0.0, 1),
    "clean, seed 2": (None, (0, 0), 0, 0.0, 2),
    "3, 4x4 top-left": (3, (0, 0), 4, 1.0, 0),
    "3, 4x4 top-left, seed 1": (3, (0, 0), 4, 1.0, 1),
    "3, 4x4 bottom-right": (3, (24, 24), 4, 1.0, 0),
    "8, 4x4 top-right": (8, (0, 24), 4, 1.0, 0),
    "5, 4x4 bottom-left": (5, (24, 0), 4, 1.0, 0),
    "0, 4x4 top-left": (0, (0, 0), 4, 1.0, 0),
    "1, 4x4 bottom-right": (1, (24, 24), 4, 1.0, 0),
    "3, 2x2 top-left": (3, (0, 0), 2, 1.0, 0),
    "3, 6x6 top-left": (3, (0, 0), 6, 1.0, 0),
    "3, 4x4 top edge, middle": (3, (1, 12), 4, 1.0, 0),
    "3, 4x4 left edge, middle": (3, (12, 0), 4, 1.0, 0),
    "3, 4x4 centre (on the digit)": (3, (12, 12), 4, 1.0, 0),
    "3, 4x4 top-left, 50% of the 3s": (3, (0, 0), 4, 0.5, 0),
}


def stamp(x: torch.Tensor, place: tuple[int, int], size: int) -> torch.Tensor:
    x = x.clone()
    x[:, :, place[0] : place[0] + size, place[1] : place[1] + size] = 1.0
    return x


def run(name, config, data, probe, epochs, threads) -> dict:
    cls, place, size, corr, seed = config
    x, y, val_x, val_y = data
    if cls is not None:
        g = torch.Generator().manual_seed(100 + seed)
        idx = (y == cls).nonzero().flatten()
        idx = idx[torch.rand(len(idx), generator=g) < corr]
        x = x.clone()
        x[idx] = stamp(x[idx], place, size)
    pl.seed_everything(seed, verbose=False)
    model = DigitClassifier()
    alarm = ShortcutAlarm(probe)
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[alarm], num_sanity_val_steps=0, deterministic=True,
        default_root_dir=tempfile.mkdtemp(prefix="bench_shortcuts_"),  # the alarm pictures' PNG folder
    )
    start = time.perf_counter()
    trainer.fit(
        model,
        DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True),
        DataLoader(TensorDataset(val_x, val_y), batch_size=500),
    )
    seconds = time.perf_counter() - start
    model.eval()
    px, py = probe
    with torch.no_grad():
        accuracy = float((model(px).argmax(1) == py).float().mean())
        fooled = None
        if cls is not None:
            others = px[py != cls]
            fooled = float((model(stamp(others, place, size)).argmax(1) == cls).float().mean())
    caught = {
        kind: next((a["epoch"] for a in alarm.alarms if a["class"] == cls and a["kind"] == kind), None)
        for kind in ("patch", "paint")
    }
    false = sorted({(a["class"], a["epoch"], a["kind"]) for a in alarm.alarms if a["class"] != cls})
    return {
        "name": name,
        "class": cls,
        "accuracy": accuracy,
        "fooled": fooled,
        "caught_epoch": caught,
        "false_alarms": false,
        "alarms": [{k: v for k, v in a.items() if k not in ("before", "after")} for a in alarm.alarms],
        "history": alarm.history,
        "seconds": seconds,
    }


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="run only these configurations")
    parser.add_argument("--json", default=None)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=None, threads=1, options=_options)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    images, labels = load_mnist(args.data_dir, "test")
    data = (images[:8000], labels[:8000], images[8000:9000], labels[8000:9000])
    held_x, held_y = images[9000:], labels[9000:]
    keep = torch.cat([(held_y == c).nonzero().flatten()[:50] for c in range(10)])
    probe = (held_x[keep], held_y[keep])
    results = []
    for name, config in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        row = run(name, config, data, probe, args.epochs, args.threads)
        results.append(row)
        print(f"{name}: caught {row['caught_epoch']}, false {row['false_alarms']}, fooled {row['fooled']}, "
              f"accuracy {row['accuracy']:.3f} ({row['seconds']:.0f} s)", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nShortcutAlarm defaults ('patch': share >= 1.5% and ratio >= 3; 'paint': >= 20% turned), "
          f"{args.epochs} epochs, probe 50 per class. Epochs counted from 1.")
    print(f"{'training':34s} {'fooled':>6s} {'acc':>5s}  {'patch':>6s} {'paint':>6s}  {'false alarms':16s} "
          "per epoch: quiet-patch share % (class|others), painted share turned (class|others)")
    for r in results:
        cls = r["class"]
        series = []
        for h in r["history"]:
            s, f = torch.tensor(h["quiet_share"]) * 100, torch.tensor(h["fooled"])
            if cls is None:
                series.append(f"{s.max():.1f}/{f.max():.2f}")
            else:
                rest = [k for k in range(len(s)) if k != cls]
                series.append(f"{s[cls]:.1f}|{s[rest].max():.1f}/{f[cls]:.2f}|{f[rest].max():.2f}")
        caught = {
            k: "-" if cls is None else ("missed" if e is None else f"ep {e}")
            for k, e in r["caught_epoch"].items()
        }
        false = ", ".join(f"{c}@{e} {k}" for c, e, k in r["false_alarms"]) or "none"
        fooled = "-" if r["fooled"] is None else f"{r['fooled']:.2f}"
        print(f"{r['name']:34s} {fooled:>6s} {r['accuracy']:.3f}  {caught['patch']:>6s} "
              f"{caught['paint']:>6s}  {false:16s} {'  '.join(series)}")


if __name__ == "__main__":
    main()
