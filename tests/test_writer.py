"""`AttributionWriter` on real `Trainer.predict` runs (one process; DDP is in test_writer_ddp.py): the same
numbers as one `peering.explain` call, in dataset order; inference mode; resuming; refusing what it cannot
do; and `load_attributions` on damaged folders."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import peering
from peering.lightning import AttributionWriter
from peering.store import ShardError, load_attributions
from tests._close import assert_close
from tests._predict import Explained, N, loader, predict, shard_files


@pytest.fixture(scope="module")
def digits_data(digits_split):
    _, _, x, y = digits_split
    return x[:N], y[:N]


# ------------------------------------------------------------------------------------------ the numbers


@pytest.mark.slow
@pytest.mark.parametrize("inference_mode", [True, False])
def test_one_process_gives_explains_numbers_in_dataset_order(
    digits_cnn, digits_data, tmp_path, inference_mode
):
    x, y = digits_data
    writer = AttributionWriter(tmp_path, top_k=2, samples_per_shard=16)
    predict(
        Explained(copy.deepcopy(digits_cnn), forward_in_predict=True),
        loader(x, y),
        writer,
        inference_mode=inference_mode,
    )
    run = peering.load_attributions(tmp_path)
    expected = peering.explain(digits_cnn, x, top_k=2)
    assert run.complete and len(run) == N
    assert run.indices.tolist() == list(range(N))
    assert torch.equal(run.targets, expected.targets)
    assert torch.equal(run.labels, y)
    assert bool(run.valid.all())
    assert_close(run.logits, expected.logits)
    assert_close(run.attributions[:], expected.attributions)
    assert run.method == "gradient" and run.output == "probability"
    # shards close after whole batches of at least 16 samples: 8+8, 8+8, 5
    assert [p.name for p in shard_files(tmp_path)] == [
        "dl0-r0-0000000000.safetensors",
        "dl0-r0-0000000016.safetensors",
        "dl0-r0-0000000032.safetensors",
    ]


@pytest.mark.slow
def test_target_label_under_inference_mode(digits_cnn, digits_data, tmp_path):
    x, y = digits_data
    writer = AttributionWriter(tmp_path, target="label", method="input_x_gradient", output="log_probability")
    predict(Explained(copy.deepcopy(digits_cnn)), loader(x, y), writer, inference_mode=True)
    run = peering.load_attributions(tmp_path)
    expected = peering.explain(digits_cnn, x, y, method="input_x_gradient", output="log_probability")
    assert torch.equal(run.targets, y.unsqueeze(1))
    assert_close(run.attributions[:], expected.attributions)
    assert run.config["target"] == "label" and run.method == "input_x_gradient"


class CachesInForward(nn.Module):
    """Caches a tensor the first time it runs: made in predict_step under inference mode, it is an
    inference tensor that autograd cannot save for a backward pass."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)
        self.scale = None

    def forward(self, x):
        if self.scale is None:
            self.scale = torch.ones(64)
        return self.linear(x.flatten(1) * self.scale)


@pytest.mark.slow
def test_what_inference_mode_breaks_is_a_clear_error_and_inference_mode_false_works(digits_data, tmp_path):
    x, y = digits_data
    torch.manual_seed(0)
    net = CachesInForward()
    with pytest.raises(RuntimeError, match=r"inference tensor.*Trainer\(inference_mode=False\)"):
        predict(
            Explained(copy.deepcopy(net), forward_in_predict=True),
            loader(x, y),
            AttributionWriter(tmp_path / "a"),
            inference_mode=True,
        )
    predict(
        Explained(copy.deepcopy(net), forward_in_predict=True),
        loader(x, y),
        AttributionWriter(tmp_path / "b"),
        inference_mode=False,
    )
    expected = peering.explain(net, x, top_k=2)
    assert_close(peering.load_attributions(tmp_path / "b").attributions[:], expected.attributions)


@pytest.mark.slow
@pytest.mark.parametrize("by_name", [True, False])
def test_a_layer_by_module_or_by_name(digits_cnn, digits_data, tmp_path, by_name):
    x, y = digits_data
    module = Explained(copy.deepcopy(digits_cnn))
    layer = "model.conv2" if by_name else module.model.conv2
    predict(module, loader(x, y), AttributionWriter(tmp_path, layer=layer))
    run = peering.load_attributions(tmp_path)
    expected = peering.explain(digits_cnn, x, top_k=2, layer=digits_cnn.conv2)
    assert run.attributions.shape == expected.attributions.shape == (N, 2, 64, 4, 4)
    assert_close(run.attributions[:], expected.attributions)
    assert run.config["layer"] == "model.conv2"


def test_a_layer_outside_the_model_is_refused(digits_cnn, digits_data, tmp_path):
    x, y = digits_data
    with pytest.raises(ValueError, match="not a submodule"):
        predict(
            Explained(copy.deepcopy(digits_cnn)), loader(x, y), AttributionWriter(tmp_path, layer=nn.ReLU())
        )
    with pytest.raises(ValueError, match="no submodule 'model.conv9'"):
        predict(
            Explained(copy.deepcopy(digits_cnn)),
            loader(x, y),
            AttributionWriter(tmp_path, layer="model.conv9"),
        )


@pytest.mark.slow
def test_nonfinite_samples_are_skipped_when_asked(digits_cnn, digits_data, tmp_path):
    x, y = digits_data
    x = x.clone()
    x[3, 0, 2, 2] = float("nan")
    x[N - 3, 0, 1, 1] = float("inf")  # in a later batch: named by its dataset index, not its place in it
    with pytest.raises(ValueError, match=r"dataset index\(es\) \[3\] are NaN or Inf"):
        predict(Explained(copy.deepcopy(digits_cnn)), loader(x, y), AttributionWriter(tmp_path / "raise"))
    late = x.clone()
    late[3] = x[4]
    with pytest.raises(ValueError, match=rf"dataset index\(es\) \[{N - 3}\] are NaN or Inf"):
        predict(Explained(copy.deepcopy(digits_cnn)), loader(late, y), AttributionWriter(tmp_path / "late"))
    x[N - 3] = x[N - 4]
    predict(
        Explained(copy.deepcopy(digits_cnn)),
        loader(x, y),
        AttributionWriter(tmp_path / "skip", nonfinite="skip"),
    )
    run = peering.load_attributions(tmp_path / "skip")
    assert run.valid.tolist() == [i != 3 for i in range(N)]
    assert run.targets[3].tolist() == [-1, -1] and bool(run.attributions[3].isnan().all())
    keep = torch.arange(N) != 3
    assert_close(run.attributions[keep], peering.explain(digits_cnn, x[keep]).attributions)


@pytest.mark.slow
def test_several_dataloaders_are_kept_apart(digits_cnn, digits_data, tmp_path):
    x, y = digits_data
    predict(
        Explained(copy.deepcopy(digits_cnn)),
        [loader(x, y), loader(x[:10], y[:10], 4)],
        AttributionWriter(tmp_path),
    )
    first, second = (peering.load_attributions(tmp_path, dataloader=d) for d in (0, 1))
    assert (len(first), len(second)) == (N, 10)
    assert_close(second.attributions[:], first.attributions[:10])


# ------------------------------------------------------------------------------------------- resuming


def _stamp(files):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in files}


@pytest.mark.slow
def test_resume_after_an_interrupted_run_explains_only_the_rest(digits_cnn, digits_data, tmp_path):
    x, y = digits_data
    with pytest.raises(RuntimeError, match="interrupted on purpose"):
        predict(
            Explained(copy.deepcopy(digits_cnn), fail_at=3),
            loader(x, y),
            AttributionWriter(tmp_path, samples_per_shard=16),
        )
    # batches 0-2 were explained: one full shard, and the buffered batch written when the run stopped
    before = _stamp(shard_files(tmp_path))
    assert sorted(before) == ["dl0-r0-0000000000.safetensors", "dl0-r0-0000000016.safetensors"]
    with pytest.raises(ShardError, match="unfinished run"):
        load_attributions(tmp_path)
    partial = load_attributions(tmp_path, allow_incomplete=True)
    assert partial.indices.tolist() == list(range(24)) and not partial.complete

    writer = AttributionWriter(tmp_path, samples_per_shard=16, chunk_size=5)  # chunking is not an argument
    predict(Explained(copy.deepcopy(digits_cnn)), loader(x, y), writer)
    assert writer._loaders[0].explained == N - 24  # the first 24 were not explained again
    after = _stamp(shard_files(tmp_path))
    assert {k: after[k] for k in before} == before  # the finished shards were left alone
    run = load_attributions(tmp_path)
    assert run.indices.tolist() == list(range(N))
    assert_close(run.attributions[:], peering.explain(digits_cnn, x).attributions)

    again = AttributionWriter(tmp_path, samples_per_shard=16)  # a finished run: nothing to do
    predict(Explained(copy.deepcopy(digits_cnn)), loader(x, y), again)
    assert again._loaders[0].explained == 0 and _stamp(shard_files(tmp_path)) == after


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"method": "smoothgrad"}, "method"),
        ({"top_k": 3}, "top_k"),
        ({"output": "logit"}, "output"),
        ({"n_samples": 4, "method": "smoothgrad"}, "method_options"),
    ],
)
def test_a_rerun_with_other_arguments_is_refused(digits_cnn, digits_data, tmp_path, change, named):
    x, y = digits_data
    predict(Explained(copy.deepcopy(digits_cnn)), loader(x[:8], y[:8]), AttributionWriter(tmp_path))
    with pytest.raises(ValueError, match=f"other arguments.*{named}"):
        predict(
            Explained(copy.deepcopy(digits_cnn)), loader(x[:8], y[:8]), AttributionWriter(tmp_path, **change)
        )


@pytest.mark.slow
def test_other_weights_or_data_are_other_arguments(digits_cnn, digits_data, tmp_path):
    x, y = digits_data
    predict(Explained(copy.deepcopy(digits_cnn)), loader(x[:8], y[:8]), AttributionWriter(tmp_path))
    other = copy.deepcopy(digits_cnn)
    with torch.no_grad():
        other.fc2.bias[0] += 1e-3
    with pytest.raises(ValueError, match="model"):
        predict(Explained(other), loader(x[:8], y[:8]), AttributionWriter(tmp_path))
    with pytest.raises(ValueError, match="datasets"):
        predict(Explained(copy.deepcopy(digits_cnn)), loader(x[:9], y[:9]), AttributionWriter(tmp_path))


# ----------------------------------------------------------------------------------- damaged folders


@pytest.fixture(scope="module")
def finished_run(digits_cnn, digits_data, tmp_path_factory):
    """A finished run of N digits in shards of 16 (three shards), to copy and damage."""
    x, y = digits_data
    out = tmp_path_factory.mktemp("finished")
    predict(Explained(copy.deepcopy(digits_cnn)), loader(x, y), AttributionWriter(out, samples_per_shard=16))
    return out


def flip_attribution_byte(data: bytes) -> bytes:
    """The shard's bytes with one bit of its attributions flipped (found through the safetensors header)."""
    header_size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + header_size])["attributions"]["data_offsets"]
    flipped = bytearray(data)
    flipped[8 + header_size + (start + end) // 2] ^= 0x01
    return bytes(flipped)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "garbage", "empty", "delete"])
def test_a_damaged_shard_is_a_clear_error_naming_it(finished_run, tmp_path, damage):
    out = _copy(finished_run, tmp_path / "run")
    shard = shard_files(out)[1]
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        shard.write_bytes(flip_attribution_byte(data))
    elif damage == "garbage":
        shard.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        shard.write_bytes(b"")
    else:
        shard.unlink()
    with pytest.raises(ShardError) as caught:
        load_attributions(out)
    assert shard.name in str(caught.value)
    assert ("missing" if damage == "delete" else "corrupt") in str(caught.value)


@pytest.mark.slow
def test_a_flipped_byte_passes_without_verify_but_not_with_it(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    shard = shard_files(out)[0]
    shard.write_bytes(flip_attribution_byte(shard.read_bytes()))
    assert len(load_attributions(out, verify=False)) == N  # headers and indices are fine
    with pytest.raises(ShardError, match="checksum"):
        load_attributions(out)


@pytest.mark.slow
def test_resuming_over_a_damaged_shard_names_it(finished_run, digits_cnn, digits_data, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    shard = shard_files(out)[2]
    shard.write_bytes(shard.read_bytes()[:100])
    x, y = digits_data
    with pytest.raises(ShardError, match=shard.name):
        predict(
            Explained(copy.deepcopy(digits_cnn)), loader(x, y), AttributionWriter(out, samples_per_shard=16)
        )


@pytest.mark.slow
def test_lazy_reads_equal_the_whole(finished_run):
    run = load_attributions(finished_run)
    whole = run.attributions[:]
    assert run.attributions.shape == whole.shape == (N, 2, 1, 8, 8)
    picks = torch.tensor([36, 0, 17, 17, -1])
    assert torch.equal(run.attributions[picks], whole[picks])
    assert torch.equal(run.attributions[5], whole[5])
    assert torch.equal(run.attributions[3:30:4], whole[3:30:4])
    assert torch.equal(run.attributions[run.valid], whole)
    assert torch.equal(run.attributions[2:6, 1], whole[2:6, 1])
    assert torch.cat([b for _, b in run.attributions.batches(10)]).equal(whole)
    with pytest.raises(IndexError):
        run.attributions[N]


# ------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 0},
        {"output": "softmax"},
        {"method": "nope"},
        {"chunk_size": 0},
        {"target": "labels"},
        {"target": -1},
        {"samples_per_shard": 0},
        {"nonfinite": "ignore"},
        {"unpack": 3},
        {"layer": 3},
        {"bogus_option": 1},
    ],
)
def test_bad_arguments_fail_at_construction(tmp_path, kwargs):
    with pytest.raises((ValueError, TypeError)):
        AttributionWriter(tmp_path, **kwargs)


@pytest.mark.slow
def test_an_iterable_dataset_is_refused_clearly(digits_cnn, digits_data, tmp_path):
    x, y = digits_data

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y, strict=True))

    with pytest.raises(RuntimeError, match="map-style datasets"):
        predict(
            Explained(copy.deepcopy(digits_cnn)),
            DataLoader(Stream(), batch_size=8),
            AttributionWriter(tmp_path),
        )
