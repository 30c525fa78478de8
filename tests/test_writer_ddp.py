"""`AttributionWriter` under Lightning DDP: 2 CPU processes (ddp_spawn, gloo), 37 digits in batches of 8.

Lightning's `UnrepeatedDistributedSampler` gives rank 0 the even positions (19 digits) and rank 1 the odd
ones (18): uneven, no padding. Each rank writes its own shards; `load_attributions` must give back all 37
once, in dataset order, with the numbers of one `peering.explain` call over the 37.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed
from safetensors.torch import load_file

import peering
from peering.lightning import AttributionWriter
from peering.store import read_manifest
from tests._close import assert_close
from tests._predict import BATCH, Explained, N, loader, predict, shard_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_data(digits_split):
    _, _, x, y = digits_split
    return x[:N], y[:N]


@pytest.fixture(autouse=True)
def _gloo():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def two_processes(module, data, writer) -> None:
    predict(module, data, writer, strategy="ddp_spawn", devices=2)


def test_two_processes_give_one_explain_calls_numbers_in_order(digits_cnn, digits_data, tmp_path):
    x, y = digits_data
    two_processes(Explained(copy.deepcopy(digits_cnn)), loader(x, y), AttributionWriter(tmp_path))
    run = peering.load_attributions(tmp_path)
    expected = peering.explain(digits_cnn, x, top_k=2)
    assert run.complete and run.indices.tolist() == list(range(N))  # every sample once, in order
    assert torch.equal(run.targets, expected.targets) and torch.equal(run.labels, y)
    assert_close(run.logits, expected.logits)
    assert_close(run.attributions[:], expected.attributions)
    # one shard per rank, each holding that rank's interleaved part of the dataset
    files = shard_files(tmp_path)
    assert [f.name for f in files] == ["dl0-r0-0000000000.safetensors", "dl0-r1-0000000001.safetensors"]
    assert load_file(files[0])["indices"].tolist() == list(range(0, N, 2))
    assert load_file(files[1])["indices"].tolist() == list(range(1, N, 2))
    assert read_manifest(tmp_path)["complete"]["0"] == {"samples": N, "shards": [f.name for f in files]}


def test_two_processes_resume_what_one_process_left(digits_cnn, digits_data, tmp_path):
    x, y = digits_data
    with pytest.raises(RuntimeError, match="interrupted on purpose"):
        predict(Explained(copy.deepcopy(digits_cnn), fail_at=2), loader(x, y), AttributionWriter(tmp_path))
    (first,) = shard_files(tmp_path)
    assert load_file(first)["indices"].tolist() == list(range(2 * BATCH))
    kept = first.read_bytes()

    two_processes(Explained(copy.deepcopy(digits_cnn)), loader(x, y), AttributionWriter(tmp_path))
    assert first.read_bytes() == kept
    new = [f for f in shard_files(tmp_path) if f != first]
    rest = sorted(i for f in new for i in load_file(f)["indices"].tolist())
    assert rest == list(range(2 * BATCH, N))  # only what was left, each sample once
    run = peering.load_attributions(tmp_path)
    assert run.indices.tolist() == list(range(N))
    assert_close(run.attributions[:], peering.explain(digits_cnn, x).attributions)
