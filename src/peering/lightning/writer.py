"""`AttributionWriter`: explain a whole dataset on Lightning's predict loop, on every device, into shards.

``Trainer.predict`` runs the data through the model on every rank, with Lightning's
``UnrepeatedDistributedSampler`` (no padded duplicates) and the dataset index of every sample in each batch.
This `BasePredictionWriter` explains each batch with `peering.explain` where it is, on its rank, and writes
the results as shards of that rank (see `peering.store` for the format); `peering.load_attributions` reads
them back in dataset order. Nothing is gathered across ranks but one count at the end.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn
from typing_extensions import override

from peering._files import FolderLock
from peering._model import OUTPUTS, ForwardKwargs, Output
from peering._validate import callable_or_none, int_at_least, one_of, optional
from peering.attribution.explanation import Explanation, explain
from peering.attribution.methods import AttributionMethod, make_method
from peering.errors import (
    PeeringError,
    PeeringRuntimeError,
    PeeringTypeError,
    PeeringValueError,
    RunInterrupted,
)
from peering.lightning.batches import Batch, as_model_dtype, unpack_batch
from peering.lightning.process_group import destroy_at_exit
from peering.lightning.sinks import BackgroundWriter
from peering.lightning.stopping import StopSignals, die_with_parent, signal_name
from peering.lightning.writer_config import (
    _fingerprint,
    _jsonable,
    _layer_name,
    _length,
    _model_class,
    _predict_loaders,
    _resolve_layer,
)
from peering.lightning.writer_folder import finished_samples, prepare_folder
from peering.memory import MemoryBudget
from peering.store import (
    SHARDS,
    ShardError,
    config_hash,
    open_shard,
    read_manifest,
    shard_path,
    write_manifest,
    write_shard,
)

__all__ = ["AttributionWriter"]

log = logging.getLogger(__name__)

_SHARD_BYTES = 128 << 20  # a shard is closed at samples_per_shard samples or about this many bytes
_INFERENCE_HINT = (
    "a tensor the model computes with is an inference tensor, which autograd cannot differentiate through: "
    "its weights were created or loaded inside torch.inference_mode(), or it cached a tensor during "
    "predict_step. Create or load the model outside inference mode, or run Trainer(inference_mode=False)"
)


@dataclass
class _Loader:
    """The writer's state for one predict dataloader on this rank."""

    length: int | None
    done: Tensor | None = None  # bool [length]: samples already in shards of an earlier run
    seen: int = 0  # samples of this run's batches (explained now or before)
    explained: int = 0
    parts: list[dict[str, Tensor]] = field(default_factory=list)
    buffered: int = 0
    buffered_bytes: int = 0


class AttributionWriter(BasePredictionWriter):
    """Explain every sample ``Trainer.predict`` sees, on every rank, into shards on disk.

    Args:
        out_dir: the output folder (created). A rerun with the same arguments resumes: samples already
            in its shards are not explained again.
        top_k: explain the model's own top ``top_k`` classes of each sample (when ``target`` is None).
        method: "gradient", "input_x_gradient", "smoothgrad", "integrated_gradients", or an
            `peering.AttributionMethod`.
        output: what is differentiated: "probability", "log_probability" or "logit" (a softmax
            classifier), "sigmoid" (multi-label: each class's own probability) or "raw" (a regression's
            output itself); see `peering.explain`.
        chunk_size: points per forward pass inside `peering.explain`. Default None: sized from
            ``memory_budget``.
        unpack: ``batch -> (inputs, labels or None)`` or ``(inputs, labels or None, forward_kwargs)`` for
            batches `peering.lightning.default_unpack` does not understand; forward arguments (an attention
            mask) are passed to the model with their samples, as in `peering.explain`.
        layer: attribute to this submodule's output instead of the input (`peering.explain`'s ``layer``):
            the module, or its name in the LightningModule (``"model.conv1"``; a name also survives
            ``ddp_spawn``'s copies of the model).
        target: None (the top ``top_k``), ``"label"`` (each sample's label from the batch), or a class.
        output_fn: picks the class scores out of a model output that is not a [B, C] tensor.
        samples_per_shard: a rank closes a shard after this many samples (or about 128 MiB), whole
            batches only. Smaller shards lose less work to an interruption; larger ones mean fewer files.
        shared_kwargs: names of forward arguments the model takes whole for every sample (not split with
            the samples; see `peering.explain`).
        nonfinite: "raise" (default) stops on a NaN/Inf input or logit, naming the samples by dataset
            index; "skip" stores such samples with ``valid`` False and NaN attributions.
        lock: hold an exclusive lock on ``out_dir`` for the run (global rank zero; `FolderLock`): a second
            writer into the same folder is refused with the holder's PID. `explain_dataset` holds it
            itself and passes False.
        verify_done: before skipping the samples earlier runs wrote, check their shards' checksums whole
            (about 2 GB/s); False checks only the headers and the indices.
        handle_signals: SIGTERM and SIGINT stop the run at the next batch, after writing what was
            explained, with `peering.errors.RunInterrupted` (a second SIGINT stops at once).
        memory_budget: the most memory explaining one batch may use at its peak, as in
            `peering.explain`: bytes, a size string ("2GiB"), a share of free memory or a
            `peering.memory.MemoryBudget`. Default: half the free CUDA memory, or a quarter of the
            available RAM, measured at each batch.
        **method_options: options of the method, e.g. ``n_samples=8`` for SmoothGrad.

    What "the same arguments" means: ``out_dir/manifest.json`` records the method and its options,
    ``output``, ``top_k`` or ``target``, ``layer``, ``output_fn``'s name, ``nonfinite``, a CRC-32 of the
    model's weights and buffers, and the length of each predict dataset. A rerun whose record differs is
    refused with the differences named; ``chunk_size``, ``memory_budget``, ``samples_per_shard``, the batch
    size and the number of devices may change (they change the numbers only in the last bits). SmoothGrad
    draws its noise per batch from ``seed``, so its numbers also depend on how samples are batched.

    The LightningModule needs only ``forward``; what its ``predict_step`` returns is not used (a
    ``predict_step`` that returns None saves a forward pass). Works with ``Trainer(inference_mode=True)``
    (the default): the batch is copied out of inference mode before it is differentiated. Every rank
    writes its own shards (``<out_dir>/shards/dl<d>-r<rank>-<first index>.safetensors``), in the
    background while the next batch is explained; global rank zero writes the manifest. Batches need the
    dataset index of each sample, which Lightning tracks for map-style datasets in a ``DataLoader``.
    Under ``ddp_spawn`` each rank is killed if the process that started it dies, so no orphan writes on.

    >>> import tempfile, torch, lightning.pytorch as pl, peering
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from peering.models import DigitClassifier
    >>> from peering.lightning import AttributionWriter
    >>> class Explained(DigitClassifier):
    ...     def predict_step(self, batch, batch_idx):
    ...         return None  # the writer does the work
    >>> out = tempfile.mkdtemp()
    >>> data = DataLoader(TensorDataset(torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))), batch_size=8)
    >>> trainer = pl.Trainer(callbacks=[AttributionWriter(out, top_k=2)], logger=False,
    ...                      enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.predict(Explained(image_size=8), data, return_predictions=False)
    >>> run = peering.load_attributions(out)
    >>> run.attributions.shape, run.indices.tolist() == list(range(20))
    (torch.Size([20, 2, 1, 8, 8]), True)
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        top_k: int = 2,
        method: str | AttributionMethod = "gradient",
        output: Output = "probability",
        chunk_size: int | None = None,
        unpack: Callable[[Any], tuple[Any, ...]] | None = None,
        layer: nn.Module | str | None = None,
        target: Literal["label"] | int | None = None,
        *,
        output_fn: Callable[[Any], Tensor] | None = None,
        samples_per_shard: int = 1024,
        nonfinite: Literal["raise", "skip"] = "raise",
        shared_kwargs: Sequence[str] | None = None,
        lock: bool = True,
        verify_done: bool = True,
        handle_signals: bool = True,
        memory_budget: MemoryBudget | int | float | str | None = None,
        **method_options: Any,
    ) -> None:
        super().__init__("batch")
        int_at_least("top_k", top_k, 1)
        one_of("output", output, OUTPUTS)
        optional(int_at_least, "chunk_size", chunk_size, 1)
        self.memory_budget = MemoryBudget.parse(memory_budget)
        if layer is not None and not isinstance(layer, (str, nn.Module)):
            raise PeeringTypeError(
                f"layer must be a submodule of the model or its name, got {type(layer).__name__}"
            )
        callable_or_none("unpack", unpack, "batch -> (inputs, labels) or (inputs, labels, forward_kwargs)")
        class_index = isinstance(target, int) and not isinstance(target, bool) and target >= 0
        if not (target is None or target == "label" or class_index):
            raise PeeringValueError(f"target must be None, 'label' or a class index >= 0, got {target!r}")
        int_at_least("samples_per_shard", samples_per_shard, 1)
        one_of("nonfinite", nonfinite, ("raise", "skip"))
        self._method_instance = make_method(method, dict(method_options))  # bad names fail now, not mid-run
        self.out_dir = Path(out_dir)
        self.top_k = top_k
        self.method = method
        self.output = output
        self.chunk_size = chunk_size
        self.unpack = unpack
        self.layer = layer
        self.target = target
        self.output_fn = output_fn
        self.samples_per_shard = samples_per_shard
        self.nonfinite = nonfinite
        self.method_options = dict(method_options)
        if shared_kwargs is not None and (
            isinstance(shared_kwargs, str) or not all(isinstance(n, str) for n in shared_kwargs)
        ):
            raise PeeringTypeError(f"shared_kwargs must be a list of argument names, got {shared_kwargs!r}")
        self.shared_kwargs = None if shared_kwargs is None else tuple(shared_kwargs)
        self.lock = bool(lock)
        self.verify_done = bool(verify_done)
        self.handle_signals = bool(handle_signals)
        # per run
        self._layer: nn.Module | None = None
        self._loaders: dict[int, _Loader] = {}
        self._config_hash = ""
        self._writer: BackgroundWriter | None = None
        self._rank = 0
        self._world_size = 1
        self._lock: FolderLock | None = None
        self._stop = StopSignals()
        self._batches = 0

    # ---------------------------------------------------------------------------------------- Lightning

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        die_with_parent()  # a ddp_spawn rank: no orphan when the parent dies
        destroy_at_exit()  # a Gloo rank that exits with its process group alive may abort
        self._stop = StopSignals()  # installed in on_predict_start, after Lightning's own handlers

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rank, self._world_size = trainer.global_rank, trainer.world_size
        self._layer = _resolve_layer(pl_module, self.layer)
        loaders = _predict_loaders(trainer)
        lengths = {d: _length(loader) for d, loader in enumerate(loaders)}
        config = self._config(pl_module, lengths)
        self._config_hash = config_hash(config)
        error: PeeringError | None = None
        if trainer.is_global_zero:
            try:
                if self.lock:
                    self._lock = FolderLock(self.out_dir, "AttributionWriter").acquire()
                prepare_folder(self.out_dir, config, self._config_hash, self.verify_done)
            except PeeringError as err:
                error = err
        error = trainer.strategy.broadcast(error, src=0)  # every rank stops on rank zero's refusal
        if error is not None:
            raise error
        self._loaders = {d: _Loader(length) for d, length in lengths.items()}
        for d, state in self._loaders.items():
            state.done = finished_samples(self.out_dir, d, state.length, self._config_hash)
        if self.handle_signals:  # after Lightning registered its handlers: its teardown puts back what it
            self._stop.install()  # found, which must not be ours (it would outlive the run on an exception)
        self._batches = 0
        self._writer = BackgroundWriter(max_pending=2)

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self._raise_write_errors()
        self._write_batch(pl_module, batch, batch_indices, dataloader_idx)
        self._batches += 1
        if self._stop.requested:  # stop at this batch boundary, after writing what is buffered (under
            self._flush_all()  # ddp_spawn no on_exception hook runs in the ranks)
            self._end_run()
            raise RunInterrupted(
                f"AttributionWriter stopped by {signal_name(self._stop.signum or 0)} after {self._batches} "
                f"batch(es) on rank {self._rank}; what was explained is written to {self.out_dir}: run the "
                "same Trainer.predict again to resume",
                self._stop.signum or 0,
            )

    def _write_batch(
        self, pl_module: pl.LightningModule, batch: Any, batch_indices: Any, dataloader_idx: int
    ) -> None:
        try:
            found = unpack_batch(batch, self.unpack, allow_integer=self._layer is not None,
                                 shared=self.shared_kwargs, multilabel=self.output == "sigmoid")
        except PeeringTypeError as err:
            raise PeeringTypeError(
                f"AttributionWriter: {err}; pass unpack=lambda batch: (inputs, labels) (or (inputs, labels, "
                "forward_kwargs))"
            ) from None
        n = len(found)
        if batch_indices is None or len(batch_indices) != n:
            raise PeeringRuntimeError(
                "AttributionWriter needs the dataset index of every sample, which Lightning tracks only for "
                "map-style datasets in a torch DataLoader (it got "
                f"{'none' if not batch_indices else len(batch_indices)} for a batch of {n})"
            )
        state = self._loaders.setdefault(dataloader_idx, _Loader(None))
        indices = torch.as_tensor(list(batch_indices), dtype=torch.int64)
        state.seen += n
        if state.done is not None:
            if state.length is not None and n and int(indices.max()) >= state.length:
                raise PeeringRuntimeError(
                    f"dataset index {int(indices.max())} is beyond the dataset's {state.length}"
                )
            todo = ~state.done[indices]
            if not bool(todo.any()):
                return
            if not bool(todo.all()):
                keep = todo.nonzero().flatten()
                indices, found = indices[keep], _rows(found, keep)
        inputs, labels = found.inputs, found.labels
        exp = self._explain(pl_module, inputs, labels, found.forward)
        if self.nonfinite == "raise" and not bool(exp.valid.all()):
            bad = indices[~exp.valid.cpu()].tolist()
            raise PeeringValueError(
                f"AttributionWriter: the inputs or logits of dataset index(es) {bad[:10]}"
                f"{' ...' if len(bad) > 10 else ''} are NaN or Inf; fix those samples, or skip them "
                "(nonfinite='skip'; peering explain-dataset --nonfinite skip)"
            )
        self._add(state, dataloader_idx, indices, exp, labels)

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_all()
        self._close_writer()
        self._raise_write_errors()
        loaders = sorted(self._loaders)
        seen = torch.tensor(
            [self._loaders[d].seen for d in loaders], dtype=torch.int64, device=trainer.strategy.root_device
        )
        totals = trainer.strategy.reduce(seen, reduce_op="sum")  # every rank's shards are on disk after this
        if not trainer.is_global_zero:
            return
        manifest = read_manifest(self.out_dir) or {}
        complete = {}
        for d, total in zip(loaders, totals.tolist(), strict=True):
            complete[str(d)] = self._completion(d, int(total))
        manifest = {k: v for k, v in manifest.items() if k not in ("format", "version")}
        manifest["complete"] = complete
        write_manifest(self.out_dir, manifest)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the signals back before Lightning's teardown puts back the handlers it found."""
        self._stop.restore()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Write what is buffered (whole batches), so that a rerun resumes after them."""
        try:
            self._flush_all()
        finally:
            self._end_run()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._end_run()

    def _end_run(self) -> None:
        """Wait for the shards being written, then give the signals and the folder's lock back."""
        try:
            self._close_writer()
        finally:
            self._stop.restore()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    # ------------------------------------------------------------------------------------------ private

    def _config(self, pl_module: nn.Module, lengths: Mapping[int, int | None]) -> dict[str, Any]:
        method = self._method_instance
        config: dict[str, Any] = {
            "method": method.name,
            "method_options": _jsonable(
                self.method_options if isinstance(self.method, str) else vars(method)
            ),
            "output": self.output,
            "target": "top_k" if self.target is None else self.target,
            "top_k": self.top_k if self.target is None else None,
            "layer": None if self._layer is None else _layer_name(pl_module, self._layer),
            "output_fn": None
            if self.output_fn is None
            else getattr(self.output_fn, "__qualname__", "callable"),
            "nonfinite": self.nonfinite,
            "model": {"class": _model_class(pl_module), "crc32": _fingerprint(pl_module)},
            "datasets": {str(d): length for d, length in lengths.items()},
        }
        if self.shared_kwargs:  # recorded only when given, so that earlier runs still resume
            config["shared_kwargs"] = sorted(self.shared_kwargs)
        return config

    def _completion(self, dataloader: int, total: int) -> dict[str, Any]:
        """The manifest's record of a finished dataloader: its shards, checked to hold ``total`` samples."""
        files = sorted((self.out_dir / SHARDS).glob(f"dl{dataloader}-r*-*.safetensors"))
        shards = [open_shard(f, self._config_hash) for f in files]
        found = sum(len(s.indices) for s in shards)
        if found != total:
            raise ShardError(
                f"the ranks explained {total} samples of dataloader {dataloader} but global rank zero finds "
                f"{found} in {self.out_dir / SHARDS}: do all nodes write to one shared folder? (e.g. "
                f"{files[0] if files else 'no shard'})"
            )
        if shards:
            indices = torch.cat([s.indices for s in shards])
            if len(torch.unique(indices)) != len(indices):
                raise ShardError(
                    f"some samples of dataloader {dataloader} were explained by two ranks (shards in "
                    f"{self.out_dir / SHARDS}): keep Lightning's distributed sampler "
                    "(Trainer(use_distributed_sampler=True)) so that each rank sees its own part"
                )
        return {"samples": total, "shards": [f.name for f in files]}

    def _explain(
        self, pl_module: pl.LightningModule, inputs: Tensor, labels: Tensor | None, forward: ForwardKwargs
    ) -> Explanation:
        target: int | Tensor | None = None
        if self.target == "label":
            if labels is None:
                raise PeeringValueError(
                    "AttributionWriter(target='label') needs labels: the batch has none that "
                    "default_unpack finds; pass unpack=lambda batch: (inputs, labels)"
                )
            with torch.inference_mode(False):  # predict batches are inference tensors: copy them out
                target = labels.detach().clone().to(torch.int64)
        elif isinstance(self.target, int):
            target = self.target
        options: dict[str, Any] = dict(self.method_options)
        if self._layer is not None:
            options["layer"] = self._layer
        try:
            with warnings.catch_warnings():
                if self.nonfinite == "raise":  # raised with the dataset indices instead
                    warnings.filterwarnings("ignore", message=r"peering: skipped .* NaN or Inf")
                return explain(
                    pl_module,
                    as_model_dtype(pl_module, inputs),
                    target,
                    top_k=self.top_k,
                    method=self.method,
                    output=self.output,
                    output_fn=self.output_fn,
                    chunk_size=self.chunk_size,
                    memory_budget=self.memory_budget,
                    nonfinite="skip",  # "raise" is checked by the caller, which knows the dataset indices
                    forward_kwargs=forward,
                    **options,
                )
        except RuntimeError as err:
            if "Inference tensors cannot be saved for backward" in str(err):
                raise PeeringRuntimeError(
                    f"AttributionWriter cannot explain this model: {_INFERENCE_HINT}"
                ) from err
            raise

    def _add(
        self, state: _Loader, dataloader: int, indices: Tensor, exp: Explanation, labels: Tensor | None
    ) -> None:
        n = len(indices)
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.int64)
        part = {
            "indices": indices,
            "attributions": exp.attributions,
            "targets": exp.targets,
            "logits": exp.logits,
            "labels": labels.detach(),
            "valid": exp.valid,
        }
        # From a CUDA device the copies to the host are queued, not waited for (no synchronisation per
        # batch): the writer thread waits for them (a CUDA event) before writing. Elsewhere they are plain.
        part = {k: v.detach().to("cpu", non_blocking=v.is_cuda) for k, v in part.items()}
        state.parts.append(part)
        state.buffered += n
        state.buffered_bytes += sum(t.numel() * t.element_size() for t in part.values())
        state.explained += n
        if state.buffered >= self.samples_per_shard or state.buffered_bytes >= _SHARD_BYTES:
            self._flush(state, dataloader)

    def _flush(self, state: _Loader, dataloader: int) -> None:
        if not state.parts:
            return
        parts, state.parts, state.buffered, state.buffered_bytes = state.parts, [], 0, 0
        first = min(int(p["indices"].min()) for p in parts if len(p["indices"]))
        path = shard_path(self.out_dir, dataloader, self._rank, first)
        event = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            event = torch.cuda.Event()
            event.record()
        metadata = {
            "config_hash": self._config_hash,
            "rank": str(self._rank),
            "world_size": str(self._world_size),
            "dataloader": str(dataloader),
        }
        if self._writer is None:
            self._writer = BackgroundWriter(max_pending=2)
        self._writer.submit(functools.partial(_write_parts, path, parts, metadata, event))

    def _flush_all(self) -> None:
        for d, state in self._loaders.items():
            self._flush(state, d)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close(timeout=None)

    def _raise_write_errors(self) -> None:
        if self._writer is None:
            return
        errors = self._writer.pop_errors()
        if errors:
            raise PeeringRuntimeError(
                f"AttributionWriter could not write a shard to {self.out_dir}: {errors[0]}"
            ) from errors[0]


def _write_parts(path: Path, parts: list[dict[str, Tensor]], metadata: dict[str, str], event: Any) -> None:
    """Concatenate a shard's batches and write it (on the writer thread)."""
    if event is not None:
        event.synchronize()  # the non-blocking copies to the host are done
    tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    write_shard(path, tensors, metadata)


def _rows(batch: Batch, keep: Tensor) -> Batch:
    """The samples ``keep`` of a batch (those not written by an earlier run)."""
    labels = batch.labels[keep.to(batch.labels.device)] if batch.labels is not None else None
    return Batch(batch.inputs[keep.to(batch.inputs.device)], labels, batch.forward.select(keep))
