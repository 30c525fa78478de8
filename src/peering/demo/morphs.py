"""The demo's morphs: test digits made into other classes, and two judges asked about them."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from peering.demo.interrupt import StopRequest
from peering.runs import names

__all__ = ["morph_view"]

# the order in which test digits are picked for morphing: the 5 first (a 5 made into an 8 is the classic)
_MORPH_LABELS = (5, 3, 7, 4, 2, 9, 8, 6, 0, 1)


def _pick_digits(model: torch.nn.Module, x: Tensor, y: Tensor, n: int) -> tuple[list[int], Tensor]:
    """Indices of up to ``n`` correctly classified test digits with different labels, and all logits."""
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + 512]) for i in range(0, len(x), 512)])
    correct = logits.argmax(1) == y
    picked: list[int] = []
    for label in _MORPH_LABELS:
        if len(picked) >= n:
            break
        hits = ((y == label) & correct).nonzero().flatten()
        if len(hits):
            picked.append(int(hits[0]))
    return picked, logits


def morph_digits(
    model: torch.nn.Module,
    test_x: Tensor,
    test_y: Tensor,
    rows: Tensor,
    prior: Any,
    run_dir: Path,
    n: int,
    steps: int,
    zoom: int,
    progress: bool,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Morph ``n`` of the test digits ``rows`` to (label + 1) mod 10 and to their runner-up; write strips
    and GIFs.

    `morph` runs with its defaults (each morph stops where the model gives its target a probability of
    0.99, smoothed steps) and ``prior``; the strips and GIFs end where each morph stopped.
    """
    import peering
    from peering.render import film_strip, save_gif, save_png

    if n == 0:
        return []
    picked_local, logits = _pick_digits(model, test_x[rows], test_y[rows], n)
    jobs: list[tuple[int, int, str, Tensor]] = []  # (test index, target, kind, logits)
    for j in picked_local:
        i = int(rows[j])
        plus_one = (int(test_y[i]) + 1) % 10
        runner_up = int(logits[j].topk(2).indices[1])
        if runner_up == plus_one:
            jobs.append((i, plus_one, "label + 1, also the runner-up", logits[j]))
        else:
            jobs.append((i, plus_one, "label + 1", logits[j]))
            jobs.append((i, runner_up, "runner-up", logits[j]))
    if not jobs:
        return []
    say(f"Morphing {len(picked_local)} test digits into other classes ({len(jobs)} morphs, <= {steps} steps)")
    inputs = test_x[[i for i, _, _, _ in jobs]]
    targets = torch.tensor([t for _, t, _, _ in jobs], dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a morph that does not arrive is recorded as such
        shown = progress and sys.stderr.isatty()  # a bar into a pipe or a log file is noise
        result = peering.morph(model, inputs, targets, steps=steps, prior=prior, progress=shown)
    morph_dir = run_dir / names.MORPH_DIR
    records = []
    for k, (i, target, kind, start_logits) in enumerate(jobs):
        label = int(test_y[i])
        stem = f"{k:02d}_{label}_to_{target}"
        save_png(film_strip(result, k, zoom=zoom, max_frames=10), morph_dir / f"{stem}.png")
        save_gif(result, k, morph_dir / f"{stem}.gif", zoom=zoom, duration_ms=100)
        arrived = bool(result.success[k])
        records.append(
            {
                "test_index": i,
                "label": label,
                "target": target,
                "kind": kind,
                "success": arrived,
                "confidence": result.confidence,
                "step": int(result.steps[k]),
                "distance": round(float(result.distance[k]), 4),
                "steps": steps,
                "p_target_start": round(float(start_logits.softmax(0)[target]), 4),
                "p_target_end": round(float(result.probabilities[k, target]), 4),
                "strip": f"{names.MORPH_DIR}/{stem}.png",
                "gif": f"{names.MORPH_DIR}/{stem}.gif",
            }
        )
    arrived_count = int(result.success.sum())
    say(f"{arrived_count} of {len(records)} morphs reached p >= {result.confidence}; strips in {morph_dir}")
    return records


def halves(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """The test digits' indices split in two at random (seeded): the judges' half and the morphs' half."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2].sort().values, order[n // 2 :].sort().values


JUDGE_EPOCHS: dict[str, tuple[int, int]] = {"digits": (30, 20), "mnist": (15, 5)}
"""Training epochs of the demo's two judges (MLP, LeNet) on their half of the held-out digits."""

JUDGED_MORPHS = 256
"""At most this many held-out digits are morphed for the judges."""

JUDGED_STEPS = 300
"""The fewest steps of the morphs and portraits shown to the judges."""


def judge(
    model: torch.nn.Module,
    prior: Any,
    train_x: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    judge_rows: Tensor,
    morph_rows: Tensor,
    dataset: str,
    seed: int,
    steps: int,
    run_dir: Path,
    zoom: int,
    say: Callable[[str], None],
    stop: StopRequest,
) -> dict[str, Any]:
    """Train two judges on data the model never saw, and ask them about morphs and portraits.

    The judges (`DigitMLP`, `DigitLeNet`, other seeds) learn from the ``judge_rows`` half of the test
    digits; up to `JUDGED_MORPHS` digits of the other half are morphed to (label + 1) mod 10 by plain
    ascent that stops at the flip (morph's old default) and by morph's defaults with ``prior``, with at
    least `JUDGED_STEPS` steps (a model trained for few epochs needs more to reach 0.99); then one portrait
    per class is drawn from the mean training digit with the same prior. Returns run.json's "judges"
    record.
    """
    import peering
    from peering.models import DigitLeNet, DigitMLP, accuracy, train_classifier
    from peering.render import portrait_row, save_png

    size = int(test_x.shape[-1])
    jx, jy = test_x[judge_rows], test_y[judge_rows]
    mlp_epochs, lenet_epochs = JUDGE_EPOCHS[dataset]
    say(f"Training two judges (an MLP and a LeNet) on {len(jx):,} held-out digits the model never saw")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        mlp = DigitMLP(image_size=size)
        torch.manual_seed(seed + 2)
        lenet = DigitLeNet(image_size=size)
    judges = {
        "MLP": train_classifier(mlp, jx, jy, epochs=mlp_epochs, batch_size=32, lr=2e-3, seed=seed + 1),
        "LeNet": train_classifier(lenet, jx, jy, epochs=lenet_epochs, batch_size=32, lr=2e-3, seed=seed + 2),
    }
    rows = morph_rows[:JUDGED_MORPHS]
    steps = max(steps, JUDGED_STEPS)
    x, y = test_x[rows], test_y[rows]
    record: dict[str, Any] = {
        "names": list(judges),
        "trained_on": len(jx),
        "accuracy": {name: round(accuracy(j, x, y), 4) for name, j in judges.items()},
        "steps": steps,
        "morphs": [],
    }
    stop.check()
    say(f"Morphing {len(x)} other held-out digits to (label + 1) mod 10 and asking the judges")
    methods = {
        "plain ascent, stops at the flip (the old default)": {"confidence": None, "smoothing": 0},
        "morph's defaults with the training digits as prior": {"prior": prior},
    }
    for method, options in methods.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = peering.morph(model, x, (y + 1) % 10, steps=steps, keep_every=steps, **options)
        stop.check()
        row: dict[str, Any] = {
            "method": method,
            "n": len(x),
            "success": round(float(res.success.float().mean()), 4),
            "mean_l2": round(float(res.distance.mean()), 4),
        }
        if bool(res.success.any()):
            check = peering.agreement(res, judges, seed=seed)
            row["agreement"] = {n: round(float(v), 4) for n, v in zip(check.names, check.morphs, strict=True)}
            row["noise"] = {n: round(float(v), 4) for n, v in zip(check.names, check.noise, strict=True)}
        record["morphs"].append(row)
    say("Drawing one portrait per class from the mean training digit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = train_x.mean(0, keepdim=True)
        portraits = peering.portraits(model, start, prior=prior, steps=steps)
    picture = names.PORTRAITS_FILE
    save_png(portrait_row(portraits, zoom=zoom), run_dir / picture)
    record["portraits"] = {
        "picture": picture,
        "classes": portraits.targets.tolist(),
        "success": portraits.success.tolist(),
        "probabilities": [round(float(p), 4) for p in portraits.probabilities.diagonal()],
    }
    if bool(portraits.success.any()):
        check = peering.agreement(portraits, judges, seed=seed)
        record["portraits"]["agreement"] = {
            n: round(float(v), 4) for n, v in zip(check.names, check.morphs, strict=True)
        }
        record["portraits"]["calls"] = {n: c.tolist() for n, c in zip(check.names, check.calls, strict=True)}
    best = record["morphs"][-1]
    say(
        f"{best['success']:.0%} of {best['n']} morphs reached p >= 0.99; the judges call "
        + " and ".join(f"{v:.0%} ({n})" for n, v in best.get("agreement", {}).items())
        + " of those the target"
    )
    return record


def morph_view(
    result: Any, index: int, *, last_frame: int | None = None, probabilities: Tensor | None = None
) -> SimpleNamespace:
    """One sample of a `MorphResult` as a one-sample result whose frames end at ``last_frame``.

    For `peering.render.film_strip` / `save_gif`, which draw all of a view's frames (a view has no
    ``steps``): the demo morphs without early stop and ends each strip at a confident frame, later than the
    arrival step where `film_strip` would end a `MorphResult`. ``last_frame`` defaults to the frame of the
    step where the sample was first predicted as its target (all frames if never); ``probabilities`` [C]
    are those of that last frame (default: the result's final ones).

    >>> import torch
    >>> from types import SimpleNamespace
    >>> res = SimpleNamespace(frames=torch.rand(11, 2, 1, 8, 8), frame_steps=torch.arange(11),
    ...                       targets=torch.tensor([3, 8]), steps=torch.tensor([4, -1]),
    ...                       probabilities=torch.rand(2, 10).softmax(1))
    >>> morph_view(res, 0).frames.shape, morph_view(res, 1).frames.shape
    (torch.Size([5, 1, 1, 8, 8]), torch.Size([11, 1, 1, 8, 8]))
    """
    frame_steps = result.frame_steps
    if last_frame is None:
        reached = int(result.steps[index])
        last_frame = int((frame_steps <= reached).sum()) - 1 if reached >= 0 else len(frame_steps) - 1
    keep = max(1, min(int(last_frame), len(frame_steps) - 1) + 1)
    probs = result.probabilities[index] if probabilities is None else probabilities
    return SimpleNamespace(
        frames=result.frames[:keep, index : index + 1],
        frame_steps=frame_steps[:keep],
        targets=result.targets[index : index + 1],
        probabilities=probs.reshape(1, -1),
    )
