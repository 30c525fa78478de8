"""Pictures of attributions on text: per-token scores drawn as coloured tokens.

Empty for now: the token pictures of issue 9 land here.
"""

from __future__ import annotations

__all__: list[str] = []
