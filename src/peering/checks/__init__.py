"""Checks: can the maps and the morphs be trusted?

- `peering.checks.sanity`: the model-parameter randomisation test (`randomisation_check`);
- `peering.checks.faithfulness`: deletion and insertion curves (`deletion_insertion`);
- `peering.checks.agreement`: do independent judges read the morphs as their targets (`agreement`).

``peering.sanity``, ``peering.faithfulness`` and ``peering.agreement`` are the same modules under their
older names.

>>> from peering.checks import randomisation_check, deletion_insertion, agreement
>>> callable(randomisation_check) and callable(deletion_insertion) and callable(agreement)
True
"""

from peering.checks.agreement import Agreement, agreement, noise_like
from peering.checks.faithfulness import DeletionInsertion, deletion_insertion, importance_ranks
from peering.checks.sanity import SanityResult, randomisation_check, spearman

__all__ = [
    "Agreement",
    "DeletionInsertion",
    "SanityResult",
    "agreement",
    "deletion_insertion",
    "importance_ranks",
    "noise_like",
    "randomisation_check",
    "spearman",
]
