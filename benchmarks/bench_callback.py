"""What `ConfusedLogitCallback` costs a training epoch: the demo CNN with and without it, alternated.

    OMP_WAIT_POLICY=PASSIVE PEERING_DATA_DIR=../shared/datasets/mnist python benchmarks/bench_callback.py

(``OMP_WAIT_POLICY=PASSIVE``: on a machine whose cores other programs keep busy, OpenMP's default
spin-waiting makes 2-thread epochs several times slower and the ratios meaningless.)

One epoch of `DigitClassifier` (the demo `DigitCNN`) on the first 8,000 MNIST t10k digits, batch 64, then
its validation on the other 2,000 (batch 256), 2 CPU threads, a `TensorBoardLogger` in every run (so
logging costs the same on both sides), each run from the same seeded initial weights. Contenders run in
rounds after one warm-up each, the order flipping every round; the figures are the median over
``--repeats`` rounds of the with/without ratio within a round, and the ratio of the median times. The
callback also times its own work (hooks on the training thread, jobs on its writer thread) as a share of
the epoch: a steadier figure on a machine shared with other programs.

Settings: the defaults (checks every 20 batches, confused = top two within 1.0 logit: about 20 pictures
in the epoch; the confusion atlas on: its matrix counts every validation batch, from the logits
`DigitClassifier.validation_step` returns, which the validation checks use too); Lightning Bolts'
thresholds (top logit >= 5, top two within 0.1: the defaults when issue #3 set its target, which almost
never trigger); the defaults with a module whose ``validation_step`` returns only the loss (the checks and
the atlas then run one eval-mode forward per validation batch); the defaults without the atlas; and a
setting that triggers often (every 5 batches). Issue #3 targets: <= 1.03 at Bolts' thresholds, <= 1.15
when triggering often (Lightning Bolts' callback: 1.8 and 11); issue #12: the atlas keeps them. The wall
time includes the callback's background writer being flushed at the end of ``fit``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from _common import parse_args  # the script's own folder is on sys.path
from peering.data import load_mnist
from peering.lightning import ConfusedLogitCallback
from peering.models import DigitClassifier

OFTEN = "often (interval 5)"
LOSS_ONLY = "defaults, validation_step returns only the loss"
NO_ATLAS = "defaults, atlas=False"
BOLTS = "Bolts' thresholds (5.0, 0.1)"
SETTINGS = {
    "defaults": {},
    BOLTS: {"min_logit_value": 5.0, "max_logit_difference": 0.1},
    LOSS_ONLY: {},
    NO_ATLAS: {"atlas": False},
    OFTEN: {"logging_batch_interval": 5},
}
TARGETS: dict[str, str] = {
    "defaults": "no target of its own: about 20 pictures an epoch, Bolts' thresholds about none",
    BOLTS: "target <= 1.03",
    LOSS_ONLY: "no target: a forward pass over the validation set",
    NO_ATLAS: "no target of its own",
    OFTEN: "target <= 1.15",
}


class LossOnlyClassifier(DigitClassifier):
    """`DigitClassifier` whose ``validation_step`` returns the loss alone, as many modules do: the confusion
    atlas then computes the logits itself."""

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def, override]
        return super().validation_step(batch, batch_idx)["loss"]


class TimedCallback(ConfusedLogitCallback):
    """The callback, timing its own work: wall time in its hooks on the training thread, and CPU time of
    the jobs on its writer thread. Its share of an epoch barely moves when other programs slow the whole
    machine down (both sides slow down alike), so it is a steadier figure than the with/without ratio."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.hook_seconds = 0.0
        self.writer_cpu_seconds = 0.0

    def on_train_batch_end(self, *args: object, **kwargs: object) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        self.hook_seconds += time.perf_counter() - start

    def on_validation_batch_end(self, *args: object, **kwargs: object) -> None:
        start = time.perf_counter()
        super().on_validation_batch_end(*args, **kwargs)
        self.hook_seconds += time.perf_counter() - start

    def on_validation_epoch_end(self, *args: object, **kwargs: object) -> None:
        start = time.perf_counter()
        super().on_validation_epoch_end(*args, **kwargs)
        self.hook_seconds += time.perf_counter() - start

    def teardown(self, *args: object, **kwargs: object) -> None:
        start = time.perf_counter()
        super().teardown(*args, **kwargs)  # joins the writer thread
        self.hook_seconds += time.perf_counter() - start

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        output = self._output  # where the pictures go (rank zero): time each of its writer jobs
        if output is None:
            return
        submit = output.submit

        def timed_submit(job: Callable[[], None]) -> None:
            def timed() -> None:
                start = time.thread_time()
                try:
                    job()
                finally:
                    self.writer_cpu_seconds += time.thread_time() - start

            submit(timed)

        output.submit = timed_submit  # type: ignore[method-assign]


def one_epoch(
    loader: DataLoader,
    val_loader: DataLoader,
    root: str,
    settings: dict | None,
    module: type = DigitClassifier,
) -> tuple[float, float, TimedCallback | None]:
    """(wall seconds, process CPU seconds) of `trainer.fit` for one epoch (and its validation) from seeded
    initial weights, and the callback used, if any."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = module()
        callback = None if settings is None else TimedCallback(**settings)
        trainer = pl.Trainer(
            max_epochs=1,
            logger=TensorBoardLogger(root),
            callbacks=[callback] if callback else [],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            accelerator="cpu",
        )
        start, cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, loader, val_loader)
        return time.perf_counter() - start, time.process_time() - cpu, callback


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=5)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    images, labels = load_mnist(args.data_dir, "test")
    loader = DataLoader(TensorDataset(images[:8000], labels[:8000]), batch_size=64)
    val_loader = DataLoader(TensorDataset(images[8000:], labels[8000:]), batch_size=256)
    modules = {name: LossOnlyClassifier if name == LOSS_ONLY else DigitClassifier for name in SETTINGS}
    contenders: dict[str, dict | None] = {"without": None, **SETTINGS}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpu_times: dict[str, list[float]] = {name: [] for name in contenders}
    shares: dict[str, list[float]] = {name: [] for name in SETTINGS}
    triggers: dict[str, str] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as root:
        for name, settings in contenders.items():  # warm-up
            one_epoch(loader, val_loader, root, settings, modules.get(name, DigitClassifier))
        for round_ in range(args.repeats):
            # the order flips every round (A B C, C B A, ...) so that a machine getting slower or faster
            # during a round does not favour whoever runs first
            order = list(contenders.items())
            for name, settings in order if round_ % 2 == 0 else order[::-1]:
                seconds, cpu, callback = one_epoch(
                    loader, val_loader, root, settings, modules.get(name, DigitClassifier)
                )
                times[name].append(seconds)
                cpu_times[name].append(cpu)
                if callback is not None:
                    shares[name].append((callback.hook_seconds + callback.writer_cpu_seconds) / seconds)
                    state = callback.state_dict()
                    triggers[name] = (
                        f"{state['checks']['train']} checks, {state['triggers']['train']} with pictures, "
                        f"{state['pictures']['train']} pictures, "
                        f"{state['confused_seen']['train']} of {state['samples_checked']['train']} checked "
                        f"samples confused; {state['atlas']['matrices']} confusion matrices"
                    )

    print(
        f"\nOne epoch of DigitClassifier on 8,000 MNIST t10k digits, batch 64, validation on 2,000, "
        f"{args.threads} threads, "
        f"TensorBoardLogger; median of {args.repeats} alternated runs (all runs in seconds); "
        f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        f"({os.cpu_count()} CPUs)"
    )
    base, cpu_base = statistics.median(times["without"]), statistics.median(cpu_times["without"])
    for name, t in times.items():
        median, cpu = statistics.median(t), statistics.median(cpu_times[name])
        runs = " ".join(f"{x:.2f}" for x in t)
        print(
            f"  {name:46s} wall {median:6.2f} s (x{median / base:5.3f})  "
            f"CPU {cpu:6.2f} s (x{cpu / cpu_base:5.3f})   runs [{runs}]"
        )
        if name in triggers:
            print(f"  {'':46s} {triggers[name]}")
    # per-round ratios (each against the baseline run of the same round) show how noisy the machine was
    for name in SETTINGS:
        ratios = [a / b for a, b in zip(times[name], times["without"], strict=True)]
        print(f"  per-round wall ratios, {name}: " + " ".join(f"{r:.3f}" for r in ratios))
    print()
    for name in SETTINGS:
        ratio = statistics.median(times[name]) / base
        paired = statistics.median(a / b for a, b in zip(times[name], times["without"], strict=True))
        share = statistics.median(shares[name])
        print(
            f"{name}: median wall-time ratio {ratio:.3f}, median per-round ratio {paired:.3f} "
            f"({TARGETS[name]}); the callback's own work: {100 * share:.1f}% of the epoch"
        )


if __name__ == "__main__":
    main()
