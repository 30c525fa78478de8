"""The dataset writer's folder before a run: the manifest read (or rebuilt when it is corrupt), the
arguments compared with the last run's, and the shards of earlier runs verified before their samples are
skipped. Global rank zero does this once; the other ranks learn the outcome from it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peering.errors import PeeringValueError, ShardError
from peering.lightning.writer_config import _differences
from peering.runs.names import SHARDS
from peering.store import open_shard, read_manifest, verify_shard, write_manifest

__all__: list[str] = []  # internal: its names are used by its own package only

log = logging.getLogger("peering.lightning.writer")


def prepare_folder(out_dir: Path, config: Mapping[str, Any], config_hash: str, verify: bool) -> int:
    """Get ``out_dir`` ready for a run with ``config``; returns the number of shards verified.

    - A corrupt ``manifest.json`` is rebuilt from this run's arguments (the shards say which run they
      belong to, so shards of another run are still refused by name).
    - A manifest of other arguments is refused, naming the differences.
    - With ``verify``, every shard is checked whole (`peering.store.verify_shard`): a damaged one is
      named before its samples could be skipped as done.
    - The manifest is written only when there was none: a rerun of a finished run keeps its record that
      it is finished, whatever happens to the rerun.
    """
    try:
        manifest = read_manifest(out_dir)
    except ShardError as err:
        log.warning("peering: %s; rebuilding it from this run's arguments and the shards", err)
        manifest = None
    if manifest is not None and manifest.get("config_hash") != config_hash:
        changed = _differences(manifest.get("config", {}), config)
        raise PeeringValueError(
            f"{out_dir} holds a run with other arguments ({changed}); use another out_dir, or delete it to "
            "start over"
        )
    files = sorted((out_dir / SHARDS).glob("*.safetensors")) if (out_dir / SHARDS).is_dir() else []
    if verify:
        for file in files:
            verify_shard(file, config_hash)
    if manifest is None:
        write_manifest(out_dir, {"config": dict(config), "config_hash": config_hash})
    return len(files) if verify else 0


def finished_samples(out_dir: Path, dataloader: int, length: int | None, config_hash: str) -> Tensor | None:
    """Which samples of ``dataloader`` earlier runs already wrote (bool [length]), or None when none."""
    files = sorted((out_dir / SHARDS).glob(f"dl{dataloader}-r*-*.safetensors"))
    if not files:
        return None
    done = torch.zeros(length or 0, dtype=torch.bool)
    for file in files:
        shard = open_shard(file, config_hash)
        if len(shard.indices):
            top = int(shard.indices.max())
            if top >= len(done):
                if length is not None:
                    raise ShardError(f"shard {file} holds dataset index {top}, beyond the {length} samples")
                done = torch.cat([done, done.new_zeros(top + 1 - len(done))])
            done[shard.indices] = True
    return done
