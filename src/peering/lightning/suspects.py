"""The pictures of `LabelIssues`' most suspect samples: each read back from the training dataset by its
index, explained toward its given and its predicted class (`peering.explain`, logit gradients), drawn by
`peering.render.confusion_panels` under a line "#4711 given 3, the model says 5 from epoch 2 on"."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import default_collate

from peering.attribution.explanation import explain
from peering.errors import PeeringRuntimeError
from peering.lightning.batches import model_scores, unpack_batch

__all__: list[str] = []  # internal: its names are used by its own package only


def suspect_panels(
    trainer: pl.Trainer, pl_module: pl.LightningModule, suspects: list[dict[str, Any]], options: Any
) -> np.ndarray:
    """Panels uint8 [n, H, W, 3] of ``suspects`` (`LabelIssues.suspects`' dicts); ``options`` is the
    callback (its ``unpack``, ``output_fn``, ``projection_factor`` and ``zoom``).

    Raises `PeeringRuntimeError` when the training data cannot be indexed (an iterable dataset)."""
    from peering.render import confusion_panels, headed_panels

    dataset = getattr(trainer.train_dataloader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__"):
        raise PeeringRuntimeError("the training data is not a map-style dataset it can read samples from")
    try:
        batch = default_collate([dataset[s["index"]] for s in suspects])
    except Exception as err:
        raise PeeringRuntimeError(f"reading the suspects back from the dataset failed ({err})") from err
    b = unpack_batch(batch, options.unpack)
    given = torch.tensor([s["given"] for s in suspects])
    predicted = torch.tensor([s["predicted"] for s in suspects])
    inputs = b.inputs.to(pl_module.device)
    with torch.inference_mode(False):
        runner_up = _runner_up(pl_module, inputs, b, options, given)
        other = torch.where(predicted == given, runner_up, predicted)
        exp = explain(pl_module, inputs, torch.stack([given, other], dim=1).to(inputs.device),
                      output="logit", output_fn=options.output_fn,
                      forward_kwargs=b.forward if b.forward else None)
    probs = exp.logits.float().softmax(dim=1).cpu()
    pair = torch.stack([given, other], dim=1)
    chosen = probs.gather(1, pair)
    attributions = exp.attributions.detach().cpu()
    panels = confusion_panels(
        b.inputs.cpu(), attributions[:, 0], attributions[:, 1], class_a=given, class_b=other,
        prob_a=chosen[:, 0], prob_b=chosen[:, 1], labels=given, projection_factor=options.projection_factor,
        zoom=options.zoom, output="logit",
    )
    headers = [f"#{s['index']}  {s['sentence']}  · score {s['score']:.2f}" for s in suspects]
    return headed_panels(panels, headers).numpy()


def _runner_up(pl_module: pl.LightningModule, inputs: Any, b: Any, options: Any, given: Any) -> Any:
    """Each sample's highest-scoring class other than its given one (for suspects the model agrees with)."""
    scores = model_scores(pl_module, inputs, b.forward, options.output_fn).float().cpu()
    return scores.scatter(1, given[:, None], float("-inf")).argmax(dim=1)
