"""Can the maps be trusted? Deletion/insertion areas and the randomisation sanity check on the demo CNN.

    PEERING_DATA_DIR=../shared/datasets/mnist .venv/bin/python benchmarks/bench_faithfulness.py

On the demo CNN trained on the first 8,000 MNIST t10k digits, for 256 held-out digits (their predicted
class): the deletion and insertion areas of gradient, input x gradient, SmoothGrad, integrated
gradients, and three controls: a random ranking, the input itself (ink first, a map that knows nothing
of the model) and the gradient blurred by 2 pixels; with two baselines (0, a blank image; and a
Gaussian blur of the digit), and the time each took (explaining; scoring the curves). Then the
cascading model-parameter randomisation test of the four methods on 64 of the digits, with each
method's verdict. Last, side by side in one run: the batched curves against a per-sample loop (one
forward per sample and step, as Quantus does it) and against its floor (the same number of forward
passes in chunks of 64), and the batched Spearman against scipy called once per sample.
"""

from __future__ import annotations

import time

import scipy.stats
import torch

import peering
from _common import parse_args, race, trained_cnn  # the script's own folder is on sys.path
from peering.checks.faithfulness import _gaussian_blur, deletion_insertion
from peering.checks.sanity import randomisation_check, spearman

METHODS = ("gradient", "input_x_gradient", "smoothgrad", "integrated_gradients")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def per_sample_curves(
    model: torch.nn.Module, x: torch.Tensor, maps: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves (zero baseline) with one forward per sample, step and curve."""
    n = x[0].numel()
    counts = torch.linspace(0, n, steps + 1).round().long().tolist()
    deletion = torch.empty(x.shape[0], len(counts))
    insertion = torch.empty(x.shape[0], len(counts))
    with torch.no_grad():
        target = model(x).argmax(1)
        for i in range(x.shape[0]):
            order = maps[i].flatten().argsort(descending=True)
            for j, count in enumerate(counts):
                deleted = x[i].flatten().clone()
                deleted[order[:count]] = 0.0
                inserted = torch.zeros_like(deleted)
                inserted[order[:count]] = x[i].flatten()[order[:count]]
                for curve, xi in ((deletion, deleted), (insertion, inserted)):
                    curve[i, j] = model(xi.view(1, *x.shape[1:])).softmax(1)[0, target[i]]
    return deletion, insertion


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=3)
    model, test_x, _ = trained_cnn(args.data_dir)
    x = test_x[:256].contiguous()
    generator = torch.Generator().manual_seed(0)
    explanations, explain_seconds = {}, {}
    for method in METHODS:
        explanations[method], explain_seconds[method] = timed(
            lambda method=method: peering.explain(model, x, top_k=1, method=method)
        )
    targets = explanations["gradient"].targets[:, 0]
    maps = {m: e.attributions[:, 0] for m, e in explanations.items()}
    # controls: a random ranking; the input itself (ink first: knows nothing of the model); the gradient
    # blurred (a smoother map of the same evidence)
    maps["random"] = torch.rand(x.shape, generator=generator)
    maps["the input (no model)"] = x.clone()
    maps["gradient, blurred 2 px"] = _gaussian_blur(maps["gradient"], 2.0)
    explain_seconds.update({"random": 0.0, "the input (no model)": 0.0})
    explain_seconds["gradient, blurred 2 px"] = explain_seconds["gradient"]

    print(f"\n{len(x)} held-out MNIST digits, their predicted class, 20 steps of 5% of the pixels, "
          f"{torch.get_num_threads()} threads")
    for baseline in ("zero", "blur"):
        print(f"\nbaseline {baseline!r}: area under the class probability curve")
        print(f"  {'ranking':24s} {'deletion':>9s} {'insertion':>9s}   {'explain':>8s} {'curves':>8s}")
        for name, m in maps.items():
            result, seconds = timed(
                lambda m=m, baseline=baseline: deletion_insertion(
                    model, x, m, targets, baseline=baseline, random_control=False
                )
            )
            s = result.summary()
            print(f"  {name:24s} {s['deletion']:9.3f} {s['insertion']:9.3f}   "
                  f"{explain_seconds[name]:7.2f}s {seconds:7.2f}s")

    sample = x[:64]
    sanity, seconds = timed(lambda: randomisation_check(model, sample, methods=METHODS))
    print(f"\nsanity check on {len(sample)} digits ({seconds:.1f} s): mean rank correlation of |maps| with "
          "the trained model's as layers are re-initialised from the output down")
    layers = "  ".join(f"{('+' if i else '') + name:>7s}" for i, name in enumerate(sanity.layers))
    print(f"  {'method':22s} {layers}  {'unrelated':>9s}  verdict")
    for name in sanity.methods:
        curve = "  ".join(f"{v:7.2f}" for v in sanity.correlation[name].tolist())
        verdict = {True: "passes", False: "fails", None: "undecided"}[sanity.passed[name]]
        print(f"  {name:22s} {curve}  {sanity.unrelated[name]:9.2f}  {verdict}")

    # speed, side by side: the same deletion curves batched and one sample at a time
    few, few_maps = x[:32], maps["gradient"][:32]
    batched = deletion_insertion(model, few, few_maps, targets[:32], random_control=False)
    loop = per_sample_curves(model, few, few_maps, 20)
    for ours_curve, loop_curve in ((batched.deletion, loop[0]), (batched.insertion, loop[1])):
        assert torch.allclose(ours_curve, loop_curve, atol=1e-4), "batched and per-sample curves differ"
    flat_a, flat_b = maps["gradient"].flatten(1), maps["smoothgrad"].flatten(1)
    ours = spearman(flat_a, flat_b)
    pairs = list(zip(flat_a, flat_b, strict=True))
    theirs = torch.tensor([scipy.stats.spearmanr(a, b).statistic for a, b in pairs])
    assert torch.allclose(ours.float(), theirs.float(), atol=1e-6), "spearman differs from scipy"
    # the floor: the same number of forward passes (2 curves x 19 interior steps + 2 ends, x 32 digits)
    # in the same chunks of 64, on inputs built beforehand
    rows = few.repeat(40, 1, 1, 1)

    def floor() -> None:
        with torch.no_grad():
            for start in range(0, rows.shape[0], 64):
                model(rows[start : start + 64]).softmax(1)

    times = race(
        {
            "floor (the same forwards, chunks of 64)": floor,
            "deletion + insertion, batched": lambda: deletion_insertion(
                model, few, few_maps, targets[:32], random_control=False
            ),
            "deletion + insertion, per-sample loop": lambda: per_sample_curves(model, few, few_maps, 20),
            "spearman, batched": lambda: spearman(flat_a, flat_b),
            "spearman, scipy per sample": lambda: [scipy.stats.spearmanr(a, b) for a, b in pairs],
        },
        args.repeats,
    )
    print(f"\nspeed, median of {args.repeats} alternated runs:")
    for name, t in times.items():
        print(f"  {name:40s} {t * 1000:8.1f} ms")
    ours = times["deletion + insertion, batched"]
    print(f"curves batched / floor: {ours / times['floor (the same forwards, chunks of 64)']:.2f}")
    loop_ratio = times["deletion + insertion, per-sample loop"] / ours
    print(f"curves batched vs a per-sample loop: {loop_ratio:.1f}x faster (32 digits, 20 steps)")
    scipy_ratio = times["spearman, scipy per sample"] / times["spearman, batched"]
    print(f"spearman batched vs scipy per sample: {scipy_ratio:.1f}x faster (256 maps of 784 pixels)")


if __name__ == "__main__":
    main()
