"""Memory budgets: parsing, measurement, chunk plans, and the peak staying under the budget."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import peering
from peering._model import frozen_parameters
from peering.memory import CPU_TENSOR_CEILING, Footprint, MemoryBudget, SavedBytes, chunk_sizes

SRC = str(Path(peering.__file__).resolve().parents[1])


class Wide(nn.Module):
    """Cheap to compute, costly to remember: a 1x1 convolution to 16 channels, then 16 tanh layers whose
    outputs autograd keeps (1 MiB each per 128 x 128 sample)."""

    def __init__(self, layers: int = 16) -> None:
        super().__init__()
        self.widen = nn.Conv2d(1, 16, 1)
        self.scales = nn.Parameter(torch.linspace(0.5, 1.5, layers))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.widen(x)
        for s in self.scales:
            x = torch.tanh(x * s)
        return self.head(x.mean(dim=(2, 3)))


def _batch_sizes(model: nn.Module) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = model.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    return sizes, handle


@pytest.mark.parametrize(
    ("value", "limit", "share"),
    [(None, None, None), (2**20, 2**20, None), ("512MiB", 512 * 2**20, None), ("2 GB", 2 * 10**9, None),
     (0.3, None, 0.3), (MemoryBudget(limit=5), 5, None)],
)
def test_parse(value, limit, share):
    budget = MemoryBudget.parse(value)
    assert (budget.limit, budget.share) == (limit, share)


@pytest.mark.parametrize("value", [0, -5, 1.5, 0.0, "lots", "5 parsecs", True, [1]])
def test_parse_refuses_what_is_not_a_budget(value):
    with pytest.raises((ValueError, TypeError), match="budget|share|bytes"):
        MemoryBudget.parse(value)


def test_default_budget_is_a_share_of_what_is_free():
    assert MemoryBudget().bytes_for(torch.device("cpu")) > 0
    assert MemoryBudget(share=0.5).bytes_for(torch.device("cpu")) > MemoryBudget(share=0.1).bytes_for(
        torch.device("cpu"))


@pytest.mark.parametrize(("total", "most"), [(10, 4), (63, 21), (7, 100), (1, 1), (100, 7)])
def test_chunk_sizes_are_even_and_fit(total, most):
    sizes = chunk_sizes(total, most)
    assert sum(sizes) == total and max(sizes) <= most and max(sizes) - min(sizes) <= 1
    assert len(sizes) == -(-total // most)


def test_chunks_fit_the_budget_and_the_cpu_ceiling():
    one = Footprint(saved=10 * 2**20, largest=2**20, point=2**16)
    per_point = one.per_point(k=2, batched_classes=False)
    sizes = MemoryBudget(limit=100 * 2**20, cpu_fast=False).chunks(50, one, torch.device("cpu"), k=2)
    assert max(sizes) * per_point <= 0.8 * 100 * 2**20 and sum(sizes) == 50  # 20% for the allocator
    whole = MemoryBudget(limit=100 * 2**20, cpu_fast=False, headroom=1.0).chunks(
        50, one, torch.device("cpu"), k=2
    )
    assert max(whole) * per_point <= 100 * 2**20 < (max(whole) + 1) * per_point
    fast = MemoryBudget(limit=2**40).chunks(500, one, torch.device("cpu"), k=2)
    assert max(fast) == CPU_TENSOR_CEILING // 2**20  # every tensor of a chunk under glibc's mmap ceiling
    batched = one.per_point(k=8, batched_classes=True)
    assert batched > one.per_point(k=8, batched_classes=False)  # vmap's backward holds K gradients


def test_one_point_over_the_budget_warns_and_goes_one_at_a_time():
    one = Footprint(saved=10 * 2**20, largest=2**20)
    with pytest.warns(RuntimeWarning, match="more than the memory budget"):
        assert MemoryBudget(limit=2**20).chunks(3, one, torch.device("cpu")) == [1, 1, 1]


def test_saved_bytes_counts_activations_not_parameters():
    lin = nn.Linear(1000, 1000)
    x = torch.rand(8, 1000, requires_grad=True)
    with SavedBytes.excluding(lin.parameters()) as saved:
        torch.relu(lin(x))
    assert saved.total == 2 * 8 * 1000 * 4  # the linear's input (for the weight's gradient), relu's output
    with frozen_parameters(lin), SavedBytes.excluding(lin.parameters()) as frozen:
        torch.relu(lin(x))
    assert frozen.total == 8 * 1000 * 4  # only relu's output: the input served the weight's gradient only
    assert lin.weight.requires_grad and lin.bias.requires_grad


def test_frozen_parameters_puts_back_each_flag():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    model[1].bias.grad = torch.ones(2)
    before = [p.requires_grad for p in model.parameters()]
    peering.explain(model, torch.rand(4, 3))
    assert [p.requires_grad for p in model.parameters()] == before
    assert_close(model[1].bias.grad, torch.ones(2))


def test_one_point_is_measured_then_even_chunks_fit():
    torch.manual_seed(0)
    model = Wide()
    sizes, handle = _batch_sizes(model.widen)
    budget = 64 * 2**20
    exp = peering.explain(model, torch.rand(20, 1, 128, 128), memory_budget=budget)
    handle.remove()
    assert sizes[0] == 1 and sum(sizes[1:]) == 20  # a dry forward pass of one point measures the footprint
    rest = sizes[1:]
    assert max(rest) - min(rest) <= 1 and len(rest) > 1
    per_sample = 16 * 2**20  # 16 tanh outputs of 1 MiB: at most 4 samples fit in 64 MiB
    assert max(rest) * per_sample <= budget
    assert exp.attributions.shape == (20, 2, 1, 128, 128)


def test_a_model_is_measured_once_for_points_of_one_shape():
    model = Wide(layers=4)
    sizes, handle = _batch_sizes(model.widen)
    peering.explain(model, torch.rand(7, 1, 64, 64), memory_budget="8MiB")
    first = list(sizes)
    peering.explain(model, torch.rand(7, 1, 64, 64), memory_budget="8MiB")
    again = sizes[len(first):]
    peering.explain(model, torch.rand(7, 1, 32, 32), memory_budget="8MiB")
    other = sizes[len(first) + len(again):]
    handle.remove()
    assert first[0] == 1 and 1 not in again and sum(again) == 7  # the footprint remembered
    assert other[0] == 1  # another shape, another footprint


def test_chunk_size_wins_over_the_budget():
    model = Wide(layers=2)
    sizes, handle = _batch_sizes(model.widen)
    peering.explain(model, torch.rand(11, 1, 32, 32), memory_budget=2**20, chunk_size=4)
    handle.remove()
    assert sizes == [4, 4, 3]


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_path_points_cut_anywhere_give_the_same_result(method):
    """7 samples a set: budget chunks start and end inside sets; the result is the one-chunk result."""
    torch.manual_seed(0)
    model = Wide(layers=4)
    x = torch.rand(7, 1, 64, 64)
    options = {"steps": 5} if method == "integrated_gradients" else {"n_samples": 5, "seed": 2}
    whole = peering.explain(model, x, method=method, chunk_size=10_000, **options)
    sizes, handle = _batch_sizes(model.widen)
    cut = peering.explain(model, x, method=method, memory_budget=4 * 2**20, **options)
    handle.remove()
    assert any(s % 7 for s in sizes[1:])  # chunks that split sets
    assert_close(cut.attributions, whole.attributions)
    assert torch.equal(cut.targets, whole.targets)


def test_morph_measures_one_sample_then_chunks_the_same_morph():
    torch.manual_seed(0)
    model = Wide(layers=3)
    x = torch.rand(9, 1, 32, 32)
    sizes, handle = _batch_sizes(model.widen)
    options = {"steps": 3, "smoothing": 0, "confidence": None}
    with pytest.warns(UserWarning, match="did not reach"):
        res = peering.morph(model, x, 3, memory_budget=2 * 2**20, **options)
    handle.remove()
    assert sizes[0] == 1 and 1 < max(sizes[1:]) < 9  # the dry run of one sample, then chunks that fit
    with pytest.warns(UserWarning, match="did not reach"):
        ref = peering.morph(model, x, 3, chunk_size=9, **options)
    assert_close(res.frames, ref.frames)


_PEAK = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_memory import Wide
    import peering
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = Wide(), torch.rand(48, 1, 128, 128)
    peering.explain(model, x[:2], memory_budget={budget}, chunk_size={chunk})  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset this process's peak resident memory (VmHWM)
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    base = status("VmRSS:")
    peering.explain(model, x, memory_budget={budget}, chunk_size={chunk})
    print(json.dumps(status("VmHWM:") - base))
""")


def _peak_in_child(budget: int, chunk: int | None) -> int:
    code = _PEAK.format(tests=str(Path(__file__).parent), budget=budget, chunk=chunk)
    # glibc keeps freed heap blocks resident for reuse, so RSS overstates live tensors by up to ~1.7x
    # here; with every allocation over 64 KiB mmapped (and unmapped when freed), RSS is the live bytes
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_peak_memory_stays_under_the_budget_on_cpu():
    """48 samples of 16 MiB of activations each: all in one chunk 0.8+ GiB; with a 128 MiB budget the
    process's peak memory (live allocations, see `_peak_in_child`) grows by less than 128 MiB."""
    budget = 128 * 2**20
    unbudgeted = _peak_in_child(budget, 48)
    budgeted = _peak_in_child(budget, None)
    assert unbudgeted > 4 * budget  # the model's activations would blow the budget
    assert budgeted <= budget, f"peak grew {budgeted / 2**20:.0f} MiB over a {budget / 2**20:.0f} MiB budget"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_stays_under_the_budget_on_cuda():
    torch.manual_seed(0)
    model, x = Wide().cuda(), torch.rand(48, 1, 128, 128, device="cuda")
    budget = 128 * 2**20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    peering.explain(model, x, memory_budget=budget)
    assert torch.cuda.max_memory_allocated() - base <= budget


# ------------------------------------------------------------------ the callback, the writer, the checks


def test_the_checks_size_their_forward_passes_from_the_budget():
    """deletion_insertion and agreement score in no-grad chunks sized from one sample's largest module
    output; the numbers are those of one big chunk."""
    torch.manual_seed(0)
    model = Wide(layers=2)
    x = torch.rand(6, 1, 64, 64)
    maps = peering.explain(model, x, top_k=1, chunk_size=6)
    sizes, handle = _batch_sizes(model.widen)
    small = peering.deletion_insertion(model, x, maps, steps=4, memory_budget=8 * 2**20)
    handle.remove()
    whole = peering.deletion_insertion(model, x, maps, steps=4, chunk_size=10_000)
    assert 1 < max(sizes[1:]) < 6 * 2 and sizes[0] == 1  # a dry run of one sample, then chunks that fit
    assert_close(small.deletion, whole.deletion)
    assert_close(small.insertion, whole.insertion)
    with pytest.raises(peering.PeeringError, match="memory_budget"):
        peering.deletion_insertion(model, x, maps, memory_budget="lots")


def test_agreement_and_randomisation_check_take_a_budget():
    torch.manual_seed(0)
    model, judge = Wide(layers=2), Wide(layers=1)
    x = torch.rand(5, 1, 32, 32)
    with pytest.warns(UserWarning, match="did not reach"):
        res = peering.morph(model, x, 3, steps=2, confidence=None, smoothing=0)
    res = dataclasses.replace(res, success=torch.ones(5, dtype=torch.bool))
    sizes, handle = _batch_sizes(judge.widen)
    budgeted = peering.agreement(res, judge, memory_budget=2**20)
    handle.remove()
    assert sizes[0] == 1 and max(sizes[1:]) < 5
    assert torch.equal(budgeted.morphs, peering.agreement(res, judge, chunk_size=5).morphs)
    sizes, handle = _batch_sizes(model.widen)
    check = peering.randomisation_check(model, x, methods=["gradient"], layers=["head", "widen"],
                                        memory_budget=2**20)
    handle.remove()
    # after the one forward pass that picks the targets: a measured point, then chunks of the budget
    assert sizes[1] == 1 and max(sizes[1:]) < 5 and check.correlation["gradient"].shape == (2,)


def test_the_callback_checks_its_budget_and_explains_within_it():
    from peering.lightning import ConfusedLogitCallback
    from peering.lightning.config import CallbackConfig
    from peering.lightning.selection import Candidates
    from peering.lightning.watch import explain_chosen

    with pytest.raises(peering.PeeringError, match="memory_budget"):
        ConfusedLogitCallback(memory_budget="plenty")
    config = CallbackConfig(memory_budget="3MiB")
    assert config.memory_budget == MemoryBudget(limit=3 * 2**20)
    torch.manual_seed(0)
    model = Wide(layers=4)
    chosen = Candidates(torch.rand(6, 1, 64, 64), torch.zeros(6, dtype=torch.int64),
                        torch.tensor([[0, 1]] * 6), torch.zeros(6))
    sizes, handle = _batch_sizes(model.widen)
    attributions, probs = explain_chosen(model, chosen, config)
    handle.remove()
    assert sizes[0] == 1 and 1 <= max(sizes[1:]) < 6  # measured, then chunks of the 3 MiB budget
    expected = peering.explain(model, chosen.inputs, chosen.classes, output="logit", chunk_size=6)
    assert_close(attributions, expected.attributions)


@pytest.mark.slow
def test_the_writer_explains_each_batch_within_its_budget(tmp_path):
    from peering.lightning import AttributionWriter
    from tests._predict import Explained, loader, predict

    torch.manual_seed(0)
    model = Wide(layers=4)
    x, y = torch.rand(12, 1, 64, 64), torch.randint(0, 10, (12,))
    with pytest.raises(peering.PeeringError, match="memory_budget"):
        AttributionWriter(tmp_path / "refused", memory_budget=-1)
    sizes, handle = _batch_sizes(model.widen)
    predict(Explained(model), loader(x, y, batch_size=6), AttributionWriter(tmp_path, memory_budget="8MiB"))
    handle.remove()
    # the first batch: one measured point, then chunks of the budget; the second: the same footprint
    assert sizes[0] == 1 and sizes.count(1) == 1 and max(sizes) < 6 and sum(sizes[1:]) == 12  # dry pass first
    run = peering.load_attributions(tmp_path)
    assert_close(run.attributions[:], peering.explain(model, x, chunk_size=12).attributions)


# ------------------------------------------------------------------------------------------- autocast


def test_explain_under_autocast_says_so_once_and_records_it():
    torch.manual_seed(0)
    model = Wide(layers=2)
    x = torch.rand(3, 1, 16, 16)
    full = peering.explain(model, x)
    assert full.computed_in == torch.float32
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = peering.explain(model, x, method="integrated_gradients", steps=4)
    said = [w for w in seen if "autocast" in str(w.message)]
    assert len(said) == 1 and "bfloat16" in str(said[0].message)  # once per call, not per chunk
    assert low.computed_in == torch.bfloat16 and low.attributions.dtype == torch.float32
