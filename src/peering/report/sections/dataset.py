"""A dataset run's section: what was explained, per-class mean maps, the most and least confident."""

from __future__ import annotations

from typing import Any

from peering.report.run import RunData
from peering.report.sections.base import Drawn, Options, png_of

__all__: list[str] = []  # internal: its names are used by its own package only


def _target_text(config: dict[str, Any]) -> str:
    target = config.get("target")
    if target == "label":
        return "each sample's label"
    if isinstance(target, int):
        return f"class {target}"
    return f"the model's top {config.get('top_k', '?')} classes"


def _dataset_facts(d: Any) -> list[tuple[str, str]]:
    a, source, config = d.attributions, d.source, d.attributions.config
    facts = [("Samples", f"{len(a):,}" + ("" if a.complete else " (an unfinished run: the samples so far)"))]
    what = {"digits": "scikit-learn's 8x8 digits", "mnist": "MNIST t10k digits"}.get(str(source.get("data")))
    if source.get("data") == "folder":
        what = f"images from {source.get('root')}"
    if what:
        facts.append(("Data", what))
    facts.append(("Explained", f"{a.method} of the {a.output} of {_target_text(config)}"))
    norm = source.get("normalisation")
    if isinstance(norm, dict) and {"mean", "std"} <= norm.keys():
        values = ", ".join(f"{k} {norm[k]}" for k in ("mean", "std"))
        seen = f"the model saw (x - mean) / std ({values}); the pictures show x as read"
        facts.append(("Normalised", seen))
    if config.get("layer"):
        facts.append(("Layer", str(config["layer"])))
    model = config.get("model", {})
    if model:
        facts.append(("Model", f"{model.get('class', '?')} (weights CRC-32 {model.get('crc32', '?')})"))
    if source.get("checkpoint"):
        facts.append(("Checkpoint", str(source["checkpoint"])))
    labelled = a.valid & (a.labels >= 0)
    if bool(labelled.any()):
        right = (a.logits[labelled].argmax(1) == a.labels[labelled]).float().mean()
        facts.append(("Accuracy", f"{float(right):.2%} of {int(labelled.sum()):,} labelled samples"))
    skipped = int((~a.valid).sum())
    if skipped:
        facts.append(("Skipped", f"{skipped:,} samples with NaN/Inf inputs or logits"))
    return facts


def _sample_rows(d: Any, positions: Any) -> list[dict[str, str]]:
    a = d.attributions
    probs = a.probabilities[positions]
    rows = []
    for pos, p in zip(positions.tolist(), probs, strict=True):
        label = int(a.labels[pos])
        top = int(p.argmax())
        rows.append(
            {
                "index": f"{int(a.indices[pos]):,}",
                "label": str(label) if label >= 0 else "?",
                "predicted": str(top),
                "confidence": f"{float(p[top]):.1%}",
                "explained": ", ".join(str(int(t)) for t in a.targets[pos] if int(t) >= 0),
            }
        )
    return rows


def _sample_picture(d: Any, positions: Any, display: Any = None) -> tuple[Drawn | None, str]:
    """One row per sample (input and its maps, `explanation_image`), or None and why not."""
    from types import SimpleNamespace

    from peering.render import explanation_image

    a = d.attributions
    if d.inputs is None:
        return None, d.no_inputs
    try:
        inputs = d.inputs(a.indices[positions])
    except Exception as err:  # a file moved since the run
        return None, f"the inputs could not be read again ({type(err).__name__}: {err})"
    if tuple(inputs.shape[1:]) != tuple(a.attributions.shape[2:]):
        return None, "the attributions are of a layer, not of the inputs: no input pictures"
    exp: Any = SimpleNamespace(  # explanation_image takes any object with these three attributes
        attributions=a.attributions[positions],
        targets=a.targets[positions],
        probabilities=a.probabilities[positions],
    )
    zoom = max(1, -(-64 // max(inputs.shape[-1], 1)))
    return png_of(explanation_image(exp, inputs, zoom=zoom, max_samples=None, display=display)), ""


def dataset(run: RunData, options: Options) -> dict[str, Any] | None:
    d = run.dataset
    if d is None:
        return None
    import torch

    from peering.render import class_mean_maps

    a = d.attributions
    valid = a.valid.nonzero().flatten()
    confidence = a.probabilities[valid].max(dim=1).values
    order = valid[torch.sort(confidence, descending=True, stable=True).indices]
    k = min(options.dataset_samples, len(order))
    groups = []
    for heading, positions in (
        ("Most confident", order[:k]),
        ("Least confident", order.flip(0)[:k]),
    ):
        picture, why = _sample_picture(d, positions, options.display) if k else (None, "no samples")
        rows = _sample_rows(d, positions)
        groups.append({"heading": heading, "picture": picture, "why": why, "rows": rows})
    means = None
    if int(d.class_counts.sum()):
        zoom = max(1, -(-64 // max(int(d.class_means.shape[-1]), 1)))
        means = png_of(class_mean_maps(d.class_means, d.class_counts, zoom=zoom))
    return {"facts": _dataset_facts(d), "groups": groups, "means": means}


# ------------------------------------------------------------------------------------------------- sanity
