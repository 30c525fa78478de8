"""The demo's randomisation sanity check, with its pictures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peering.runs import names

__all__: list[str] = []  # internal: its names are used by its own package only


def sanity_check(
    model: torch.nn.Module, digits: Tensor, run_dir: Path, seed: int, zoom: int, say: Callable[[str], None]
) -> dict[str, Any] | None:
    """Run the randomisation sanity check on ``digits``; write its pictures; its numbers for run.json."""
    from peering.checks.sanity import randomisation_check
    from peering.render import sanity_curves, sanity_maps, save_png

    if len(digits) == 0:
        return None
    say(
        f"Sanity check: re-initialising the model's layers from the output down and comparing the maps "
        f"of {len(digits)} test digits"
    )
    result = randomisation_check(model, digits, seed=seed)
    folder = run_dir / names.SANITY_DIR
    save_png(sanity_curves(result), folder / "curves.png")
    maps = {}
    for method in result.methods:
        save_png(sanity_maps(result, method, zoom=zoom), folder / f"maps_{method}.png")
        maps[method] = f"{names.SANITY_DIR}/maps_{method}.png"
    verdicts = {True: "passes", False: "fails", None: "undecided"}
    said = ", ".join(f"{m} {verdicts[result.passed[m]]} ({result.final(m):.2f})" for m in result.methods)
    say(f"Sanity check: {said}; pictures in {folder}")
    return {**result.to_dict(), "curves": f"{names.SANITY_DIR}/curves.png", "maps": maps}
