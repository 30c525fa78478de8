"""Pictures of attributions on tabular inputs (flat feature vectors [B, D]).

Empty for now: flat inputs are drawn by `peering.render.images` (a near-square grid when D is a perfect
square, else a 1-row strip) until the bar charts of issue 9 land here.
"""

from __future__ import annotations

__all__: list[str] = []
