"""Memory budgets: how many points a chunk may hold, sized from bytes measured on the model itself.

Every chunked computation in peering (the class-gradient engine behind `explain`, `morph`'s steps, the
callback, the dataset writer and the checks) asks one `MemoryBudget` how many points to put in a chunk.
The answer comes from measurement, never from the kind of model: a forward pass of one point (a dry run
in `explain`, once per model and input shape; a first chunk of one at a layer) during which the bytes
autograd saves for the backward pass are counted (`torch.autograd.graph.saved_tensors_hooks`; parameters
and buffers, which already exist, are left out). That gives the `Footprint` of one point; the points are
split into even chunks that fit the budget, the same way on every call.

What is avoided: a constant count (64 points of a ResNet-50 at 224 px are 7 GB), and retrying on
out-of-memory errors as the only mechanism (accelerate's ``find_executable_batch_size``): on CPU, Linux
rarely raises one (the process is killed or swaps first), and on CUDA the work up to the error is lost and
the allocator's cache is fragmented by then.

>>> budget = MemoryBudget(limit=2 * 2**30)
>>> budget.bytes_for(torch.device("cpu"))
2147483648
>>> MemoryBudget.parse("512MiB").limit, MemoryBudget.parse(0.1).share
(536870912, 0.1)
>>> one = Footprint(saved=80 * 2**20, largest=3 * 2**20, point=600_000)  # a ResNet-50 at 224 px
>>> one.per_point(k=2, batched_classes=False) // 2**20
92
>>> MemoryBudget(limit=2 * 2**30, cpu_fast=False).chunks(63, one, torch.device("cpu"), k=2)
[16, 16, 16, 15]
>>> budget.chunks(63, one, torch.device("cpu"), k=2)  # and each 3 MiB tensor times 10 under 32 MiB
[9, 9, 9, 9, 9, 9, 9]
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from peering.errors import PeeringTypeError, PeeringValueError

__all__ = ["Footprint", "MemoryBudget", "SavedBytes", "chunk_sizes", "forward_footprint", "model_tensors"]

# glibc's largest dynamic mmap threshold (4 MiB * sizeof(long)): on CPU, a tensor above it is mmapped
# and page-faulted afresh on every call, so chunks whose tensors stay below it run faster per point.
CPU_TENSOR_CEILING = 32 * 2**20
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class MemoryBudget:
    """How much memory a chunked computation may use at its peak, beyond what existed when it started.

    Args:
        limit: bytes. None: ``share`` of what the device has free when the computation starts.
        share: the fraction of free memory used when ``limit`` is None: of free CUDA memory
            (`torch.cuda.mem_get_info`, plus what PyTorch's allocator holds unused), or on CPU of the
            available RAM (``MemAvailable`` in /proc/meminfo, else psutil, else 2 GiB is assumed free).
            Default 0.5 on CUDA, 0.25 on CPU.
        cpu_fast: on CPU, also keep every tensor of a chunk under glibc's mmap ceiling (32 MiB), so
            that the allocator reuses its blocks instead of mapping and faulting in fresh pages on every
            call (chunks of 64 MNIST digits ran 1.5x faster than one of 256 for that reason); it only
            ever makes chunks smaller than the budget allows.
        headroom: the share of the budget the planned live bytes may fill. The rest is for the
            allocator: glibc keeps freed blocks resident, so a process's peak RSS ran 10-25% above the
            live tensor bytes on a ResNet-50 at 224 px (up to 1.7x with many small tensors); CUDA's
            caching allocator rounds up and fragments.

    The budget covers the activations saved for backward, the backward pass's transient gradients and
    the chunk's results; the caller's inputs and the model itself are not counted.
    """

    limit: int | None = None
    share: float | None = None
    cpu_fast: bool = True
    headroom: float = 0.8

    def __post_init__(self) -> None:
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise PeeringValueError(
                f"memory_budget must be a positive number of bytes, got {self.limit!r}"
            )
        if self.share is not None and not (0 < self.share <= 1):
            raise PeeringValueError(
                f"memory_budget's share of free memory must be in (0, 1], got {self.share}"
            )
        if not (0 < self.headroom <= 1):
            raise PeeringValueError(f"memory_budget's headroom must be in (0, 1], got {self.headroom!r}")

    @classmethod
    def parse(cls, value: MemoryBudget | int | float | str | None) -> MemoryBudget:
        """A budget from what a user passes: None (the default), bytes (int), a share of free memory
        (float in (0, 1]), a size string ("2GiB", "512MB") or a `MemoryBudget`."""
        if value is None:
            return cls()
        if isinstance(value, MemoryBudget):
            return value
        if isinstance(value, bool):
            raise PeeringTypeError(
                f"memory_budget must be bytes, a share of free memory, a size string or None, got {value}"
            )
        if isinstance(value, int):
            return cls(limit=value)
        if isinstance(value, float):
            if 0 < value <= 1:
                return cls(share=value)
            raise PeeringValueError(f"a float memory_budget is a share of free memory in (0, 1], got {value}")
        if isinstance(value, str):
            match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
            if match and match.group(2).lower() in _UNITS:
                return cls(limit=int(float(match.group(1)) * _UNITS[match.group(2).lower()]))
            raise PeeringValueError(f"memory_budget {value!r} is not a size such as '2GiB' or '512MB'")
        raise PeeringTypeError(
            f"memory_budget must be bytes, a share, a size string or None, got {type(value).__name__}"
        )

    def bytes_for(self, device: torch.device) -> int:
        """The budget in bytes on ``device`` now."""
        if self.limit is not None:
            return self.limit
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return max(1, int(free * (0.5 if self.share is None else self.share)))
        return max(1, int(available_ram() * (0.25 if self.share is None else self.share)))

    def resolve(self, device: torch.device) -> MemoryBudget:
        """This budget with its bytes fixed now, on ``device`` (so later chunks share one figure)."""
        return self if self.limit is not None else replace(self, limit=self.bytes_for(device), share=None)

    def chunks(
        self,
        n: int,
        footprint: Footprint,
        device: torch.device,
        *,
        k: int = 1,
        batched_classes: bool = False,
        kept: int = 0,
    ) -> list[int]:
        """Split ``n`` points into the fewest even chunks whose peak fits the budget.

        ``footprint`` is one point's measured cost, ``k`` the classes differentiated per point (batched
        into one backward pass or not), ``kept`` the bytes of results that live through all the chunks.
        When not even one point fits, one point at a time, with a warning.
        """
        return chunk_sizes(n, self.most(footprint, device, k=k, batched_classes=batched_classes, kept=kept))

    def most(
        self,
        footprint: Footprint,
        device: torch.device,
        *,
        k: int = 1,
        batched_classes: bool = False,
        kept: int = 0,
    ) -> int:
        """The most points a chunk may hold (at least 1), as in `chunks`.

        >>> forward = Footprint(saved=0, largest=2**20, no_grad=True)  # each under the 32 MiB ceiling
        >>> MemoryBudget(limit=2**30).most(forward, torch.device("cpu"))
        32
        """
        budget = self.bytes_for(device)
        per_point = footprint.per_point(k, batched_classes)
        room = int(budget * self.headroom) - kept
        if room < per_point:
            warnings.warn(
                f"peering: one point needs about {_mib(per_point)} and the results {_mib(kept)}, more than "
                f"the memory budget of {_mib(budget)}; running one point at a time. Pass a larger "
                "memory_budget, or fewer samples or classes per call",
                RuntimeWarning,
                stacklevel=5,
            )
            room = per_point
        most = room // max(per_point, 1)
        if self.cpu_fast and device.type == "cpu" and footprint.largest:
            most = min(most, CPU_TENSOR_CEILING // footprint.largest)
        return max(1, most)


def available_ram() -> int:
    """Bytes of RAM available to new allocations without swapping."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(ImportError):  # macOS, Windows: psutil when it is installed (Lightning's dep)
        psutil = importlib.import_module("psutil")
        return int(psutil.virtual_memory().available)
    return 2 * 2**30


@dataclass(frozen=True)
class Footprint:
    """What one point costs, measured: bytes saved for backward, the largest one of them, and the bytes of
    the point itself (its gradients are K of those). ``no_grad``: a forward pass without autograd (the
    checks' scoring passes), measured by `forward_footprint`: ``largest`` is then the largest output of
    a module, and nothing is saved."""

    saved: int
    largest: int
    point: int = 0
    no_grad: bool = False

    def per_point(self, k: int, batched_classes: bool) -> int:
        """Peak bytes per point of a forward pass and ``k`` input-gradient backward passes.

        Autograd keeps the saved activations until the last class's backward pass; each backward adds a
        few activation-sized gradients at a time (the incoming gradient, the outgoing one, a kernel's
        workspace: 3 of the largest), ``k`` times over when the classes are batched into one pass. The
        point's copy, its K gradients and their sum take (2K + 2) points.

        Without autograd nothing is kept from layer to layer: a few activations live at once (a layer's
        input and output, a residual branch, a kernel's workspace: 4 of the largest), and the point with
        the copy its caller made.
        """
        if self.no_grad:
            return 4 * self.largest + 2 * self.point
        return self.saved + 3 * self.largest * (k if batched_classes else 1) + (2 * k + 2) * self.point


def chunk_sizes(total: int, most: int) -> list[int]:
    """Split ``total`` points into the fewest even chunks of at most ``most`` points.

    >>> chunk_sizes(10, 4)
    [4, 3, 3]
    """
    if total <= 0:
        return []
    count = math.ceil(total / max(1, most))
    size, extra = divmod(total, count)
    return [size + 1] * extra + [size] * (count - extra)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


@dataclass
class SavedBytes:
    """Count the bytes autograd saves for backward while active, once per storage.

    Storages of ``exclude`` (the model's parameters and buffers: they exist anyway) are not counted.

    >>> lin = torch.nn.Linear(1000, 1000)
    >>> x = torch.rand(8, 1000, requires_grad=True)
    >>> with SavedBytes.excluding(lin.parameters()) as saved:
    ...     y = torch.relu(lin(x))
    >>> saved.total == 8 * 1000 * 4 * 2, saved.largest == 8 * 1000 * 4  # x for the weight, relu's result
    (True, True)
    """

    exclude: set[int] = field(default_factory=set)
    sizes: dict[int, int] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def excluding(cls, tensors: Iterable[Tensor]) -> Iterator[SavedBytes]:
        counter = cls({_storage_key(t) for t in tensors})
        with torch.autograd.graph.saved_tensors_hooks(counter._pack, _unpack):
            yield counter

    def _pack(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key and key not in self.exclude and key not in self.sizes:
            self.sizes[key] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def largest(self) -> int:
        return max(self.sizes.values(), default=0)


def forward_footprint(forward: Callable[[Tensor], Any], one: Tensor) -> Footprint:
    """The `Footprint` of a forward pass without autograd, from a dry run of ``forward`` on one sample
    ``one`` [1, ...]: the largest tensor any module outputs (a global forward hook sees every module).

    >>> seq = torch.nn.Sequential(torch.nn.Linear(10, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 2))
    >>> forward_footprint(seq, torch.rand(1, 10))
    Footprint(saved=0, largest=4000, point=40, no_grad=True)
    """
    seen = SavedBytes()

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        for t in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(t, Tensor):
                seen._pack(t)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            forward(one)
    finally:
        handle.remove()
    point = one[0].numel() * one.element_size() if one.shape[0] else 0
    return Footprint(saved=0, largest=seen.largest, point=point, no_grad=True)


def model_tensors(model: nn.Module) -> Iterator[Tensor]:
    """The parameters and buffers of a model: memory that exists whether or not it is run.

    >>> len(list(model_tensors(torch.nn.BatchNorm1d(3))))  # weight, bias, running mean, var, count
    5
    """
    yield from model.parameters()
    yield from model.buffers()


def _storage_key(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, some subclasses)
        return 0


def _unpack(t: Tensor) -> Tensor:
    return t

