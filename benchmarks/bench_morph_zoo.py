"""`morph` on a model zoo: 16 classifiers nobody tuned morph on, judged by two models that take no part.

    PEERING_DATA_DIR=../shared/datasets/mnist .venv/bin/python benchmarks/bench_morph_zoo.py

The zoo (`zoo.py`): 8 families (MLP, LeNet-5, batch-norm CNN, ViT, ResNet, GELU+LayerNorm CNN, max-pool CNN
with dropout, an ensemble), each after one epoch and well trained on MNIST t10k 0-7999, cached on disk.
Judges: `DigitMLP` and `DigitLeNet` trained on the same 8,000 digits with other seeds (as in
bench_morph_judges.py). 256 held-out digits (t10k 8000-8255; ``--digits`` fewer) are pushed to (label + 1) mod
10.

One table per zoo model, one row per setting: morph's defaults with `Prototypes` of the model's training
digits; the same without its say in stopping (``settle=None``, the rule before issue 20's last change);
with `LatentShift` (an autoencoder of the same digits, trained once and cached, with their latent
prototypes); without reference data; plain ascent to the flip (``confidence=None, smoothing=0``); and the
class portraits (the mean training digit morphed to each of the 10 classes) with either data prior.
Columns: reach (the stopping rule met within the default step budget), each judge's calls of the
target over all the digits (10 portraits), the same for the originals plus noise of each morph's L2 size,
mean L2, mean steps of those that arrived, seconds (wall clock, early stop on; they move with the load).

Then the cost per step: for each model, one forward + backward pass of the digits at the chunk size
that is fastest for that model (32, 64, 128 or 256), and each setting's time per step at that chunk size
(no early stop; the marginal time of 10 more steps, so one-off set-up such as the prototypes' search is
left out), alternated round by round, medians. With `LatentShift`, the floor is the decoder's and the
model's forward + backward. Goal (issue 20): <= 1.10.

Run it against another checkout (``PYTHONPATH=../main/src``) to get the table before a change: settings
that checkout does not have are left out. Options: ``--models tune`` / ``report`` / a comma list,
``--no-cost``, ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import peering
from _common import parse_args  # the script's own folder is on sys.path
from peering.checks.agreement import noise_like
from peering.morph.priors import Prototypes
from zoo import (  # benchmarks/ on sys.path
    NAMES,
    REPORT,
    TUNE,
    cache_dir,
    describe,
    load_judges,
    load_zoo,
    morph_split,
)

try:  # absent from checkouts before the generative prior
    from peering.morph.generative import LatentShift, train_autoencoder
except ImportError:  # pragma: no cover
    LatentShift = train_autoencoder = None

CHUNKS = (32, 64, 128, 256)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="all",
                        help="'all', 'tune', 'report' or a comma list of zoo names")
    parser.add_argument("--digits", type=int, default=256, help="held-out digits morphed (t10k 8000 on)")
    parser.add_argument("--no-cost", action="store_true", help="skip the cost per step")
    parser.add_argument("--no-quality", action="store_true", help="skip the tables (cost only)")
    parser.add_argument("--no-latent", action="store_true", help="leave LatentShift out (it is the slowest)")


def parse() -> argparse.Namespace:
    return parse_args(__doc__.splitlines()[0], repeats=5, options=_options)  # --repeats: rounds of the cost


def pick_models(spec: str) -> tuple[str, ...]:
    if spec == "all":
        return NAMES
    if spec in ("tune", "report"):
        families = TUNE if spec == "tune" else REPORT
        return tuple(n for n in NAMES if n.rsplit("-", 1)[0] in families)
    return tuple(spec.split(","))


def judged(res: Any, judges: dict, target: torch.Tensor, x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Each judge's share of all samples it calls the target: the morphs, and noise of the same L2 size."""
    noisy, _ = noise_like(x, res.distance)
    with torch.no_grad():
        calls = [float((j(res.inputs).argmax(1) == target).float().mean()) for j in judges.values()]
        noise = [float((j(noisy).argmax(1) == target).float().mean()) for j in judges.values()]
    return calls, noise


def row(name: str, res: Any, seconds: float, judges: dict, target: torch.Tensor, x: torch.Tensor) -> str:
    calls, noise = judged(res, judges, target, x)
    steps = res.steps[res.success].float().mean() if bool(res.success.any()) else float("nan")
    return (f"| {name} | {res.success.float().mean():.1%} | " + " | ".join(f"{c:.1%}" for c in calls)
            + f" | {' / '.join(f'{n:.1%}' for n in noise)} | {res.distance.mean():.2f} | {steps:.1f} "
            + f"| {seconds:.1f} |")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def floor_fn(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, chunk: int,
             decoder: Any = None, codes: torch.Tensor | None = None) -> Callable[[], None]:
    """One forward + backward pass of the batch in chunks (through the decoder first, if given)."""

    def run() -> None:
        for start in range(0, x.shape[0], chunk):
            t = target[start : start + chunk]
            if decoder is None:
                leaf = x[start : start + chunk].clone().requires_grad_(True)
                inp = leaf
            else:
                assert codes is not None
                leaf = codes[start : start + chunk].clone().requires_grad_(True)
                inp = decoder(leaf)
            score = F.log_softmax(model(inp), dim=1).gather(1, t[:, None]).sum()
            torch.autograd.grad(score, leaf)

    return run


def best_chunk(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> int:
    times = {}
    for c in [c for c in CHUNKS if c <= len(x)] or [len(x)]:
        fn = floor_fn(model, x, target, c)
        fn()
        samples = []
        for _ in range(3):
            samples.append(timed(fn)[1])
        times[c] = statistics.median(samples)
    return min(times, key=times.__getitem__)


def main() -> None:
    args = parse()
    names = pick_models(args.models)
    warnings.simplefilter("ignore")  # unreached morphs are counted in the tables
    train_x, train_y, x, target = morph_split(args.data_dir)
    x, target = x[: args.digits], target[: args.digits]
    print(f"splits: the zoo and the judges train on t10k 0-7999; {len(x)} digits t10k 8000-{7999 + len(x)} "
          "are "
          "morphed to (label + 1) mod 10; accuracy on t10k 8000-9999")
    zoo = load_zoo(args.data_dir, names)
    judges = load_judges(args.data_dir)
    print("\n".join(describe({**zoo, **judges}, args.data_dir)))
    print(f"tune half (chose the defaults): {', '.join(TUNE)}; "
          f"report half (measured only): {', '.join(REPORT)}")

    prototypes = Prototypes(train_x, train_y)
    try:  # Prototypes that have no say in stopping (before `settle`): the row to compare with
        unsettled: Prototypes | None = Prototypes(train_x, train_y, settle=None)
    except TypeError:  # pragma: no cover - a checkout before `settle`
        unsettled = None
    latent = None
    if LatentShift is not None and not args.no_latent:
        start = time.perf_counter()
        autoencoder = train_autoencoder(train_x, cache_dir=cache_dir() / "ae")
        with torch.no_grad():
            error = (autoencoder(x) - x).flatten(1).norm(dim=1).mean()
        print(f"autoencoder of the 8,000 training digits: {time.perf_counter() - start:.0f} s "
              "(cached after the "
              f"first run), mean L2 reconstruction error on the {len(x)} held-out digits {error:.2f}")
        latent = LatentShift(autoencoder, train_x, train_y)
    start_image = train_x.mean(0, keepdim=True)

    settings: list[tuple[str, dict[str, Any]]] = [("defaults + Prototypes", dict(prior=prototypes))]
    if unsettled is not None:
        settings.append(("defaults + Prototypes(settle=None)", dict(prior=unsettled)))
    if latent is not None:
        settings.append(("defaults + LatentShift", dict(prior=latent)))
    settings += [("defaults, no reference data", {}),
                 ("plain ascent to the flip", dict(confidence=None, smoothing=0))]
    portrait_settings = [("portraits + Prototypes", dict(prior=prototypes))]
    if latent is not None:
        portrait_settings.append(("portraits + LatentShift", dict(prior=latent)))

    if not args.no_quality:
        for name, model in zoo.items():
            half = "tune" if name.rsplit("-", 1)[0] in TUNE else "report"
            print(f"\n### {name} ({half} half)\n")
            header = (f"| setting | reach | {' | '.join(judges)} | noise ({' / '.join(judges)}) "
                      "| mean L2 | steps "
                      "| s |")
            print(header)
            print("|" + "---|" * (header.count("|") - 1))
            for label, options in settings:
                res, seconds = timed(lambda o=options, m=model: peering.morph(m, x, target, **o))
                print(row(label, res, seconds, judges, target, x), flush=True)
            classes = torch.arange(10)
            for label, options in portrait_settings:
                res, seconds = timed(lambda o=options, m=model: peering.portraits(m, start_image, **o))
                print(row(label, res, seconds, judges, classes, res.frames[0]), flush=True)

    if args.no_cost:
        return
    print("\ncost per step / one forward + backward at the model's fastest chunk size (median of "
          f"{args.repeats} alternated rounds; with LatentShift the floor includes the decoder):\n")
    header = "| model | chunk | floor ms | " + " | ".join(label for label, _ in settings) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, model in zoo.items():
        chunk = best_chunk(model, x, target)
        floors = {"pixel": floor_fn(model, x, target, chunk)}
        if latent is not None:
            codes = latent.autoencoder.encode(x).detach()
            floors["latent"] = floor_fn(model, x, target, chunk, latent.autoencoder.decode, codes)
        ratios: dict[str, list[float]] = {label: [] for label, _ in settings}
        floor_ms = []

        def run_morph(options: dict[str, Any], n: int) -> Callable[[], Any]:
            return lambda: peering.morph(model, x, target, steps=n, early_stop=False,  # noqa: B023
                                         chunk_size=chunk, **options)  # noqa: B023

        for fn in floors.values():
            fn()
        for _, options in settings:
            run_morph(options, 2)()
        for _ in range(args.repeats):
            for label, options in settings:
                kind = "latent" if options.get("prior") is latent and latent is not None else "pixel"
                floor = timed(floors[kind])[1]
                if kind == "pixel":
                    floor_ms.append(floor * 1000)
                short = timed(run_morph(options, 2))[1]
                long = timed(run_morph(options, 12))[1]
                ratios[label].append((long - short) / 10 / floor)
        print(f"| {name} | {chunk} | {statistics.median(floor_ms):.0f} | "
              + " | ".join(f"{statistics.median(v):.2f}" for v in ratios.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
