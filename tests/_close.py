"""Float comparisons that hold on every x86-64 CPU.

CI runs on AVX2 and AVX-512 machines, whose kernels round differently in the last bits, so two computations
that should agree are compared with a tolerance relative to the magnitude of the expected values (never a
bare ``< 1e-6``, which fails as soon as the values are large).
"""

from __future__ import annotations

import torch

# float32 has a 24-bit mantissa (~6e-8); chunking, batching or another vector width reorders the sums of a
# few thousand terms, so agreement to 1e-4 of the largest value is rounding, and anything wrong (a wrong
# mask row, a wrong class, a missing term) is orders of magnitude further off.
RTOL = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = RTOL) -> None:
    """``actual`` equals ``expected`` up to ``rtol`` of each element and of the largest |expected|."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * scale + torch.finfo(expected.dtype).tiny, equal_nan=True
    )
