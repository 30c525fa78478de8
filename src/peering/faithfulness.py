"""The older path of `peering.checks.faithfulness`, kept so that existing imports go on working."""

from peering.checks.faithfulness import (
    DeletionInsertion,
    deletion_insertion,
    importance_ranks,
)

__all__ = [
    "DeletionInsertion",
    "deletion_insertion",
    "importance_ranks",
]
