"""`ConfusedLogitCallback`'s pictures and scalars through the experiment trackers' real Lightning loggers,
offline, read back through each library's own files: W&B (offline run), MLflow (local file store), Comet
(offline archive) and Neptune (offline run; Lightning 2.6 has no working Neptune logger, so its sink is
tested on a real offline run directly).

Every tracker must hold, at the same steps, pixel for pixel the pictures the callback writes as PNG files
when there is no tracker (a reference run with the same seeded model and data: training is
deterministic), and the confused fractions at their steps. Each test is skipped with a message when its
library is not installed (``pip install -e '.[integrations]'``).
"""

from __future__ import annotations

import glob
import io
import json
import struct
import warnings
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from peering.data import load_digits
from peering.lightning import ConfusedLogitCallback, read_images, read_scalars
from peering.lightning.pictures import stack_panels
from peering.lightning.sinks import NeptuneSink, image_sinks
from tests.test_callback import ALWAYS, QUIET, TinyNet

pytestmark = pytest.mark.slow

# the callback's picture tags: panels that loggers get stacked in one picture per check, and the atlas's
# confusion matrix, one picture as it is
STACKED = ("peering/confused", "peering/val/confused", "peering/confused_pairs")
SINGLE = ("peering/confusion_matrix",)
TAGS = (*STACKED, *SINGLE, "peering/odd")
FRACTIONS = ("peering/confused_fraction", "peering/val/confused_fraction")
INSTALL = "pip install -e '.[integrations]'"


def need(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed ({INSTALL})")


def fit(root: Path, logger) -> None:
    """One epoch of 4 training batches of sklearn digits, checks at batches 1 and 3 (steps 2 and 4), one
    validation run (step 4), two pictures per check; the same seeded model every time."""
    x, y = load_digits()
    train = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32)
    val = DataLoader(TensorDataset(x[128:192], y[128:192]), batch_size=64)
    callback = ConfusedLogitCallback(top_k=2, logging_batch_interval=2, background=False, **ALWAYS)
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        max_epochs=1,
        logger=logger,
        callbacks=[callback],
        default_root_dir=root,
        enable_checkpointing=False,
        **QUIET,
    )
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(0)  # the same weights and dropout masks every time
        trainer.fit(TinyNet(size=8), train, val)


# Pictures an image API that rescales or converts arrays would change: low contrast, and all black.
ODD = [np.linspace(10, 240, 12 * 20 * 3).reshape(12, 20, 3).astype(np.uint8), np.zeros((12, 20, 3), np.uint8)]
ODD_TAG, ODD_STEP = "peering/odd", 7


def log_odd(logger) -> None:
    """The ODD pictures through the logger's sink, as the callback would log them."""
    (sink,) = image_sinks([logger])
    sink.log_images(ODD_TAG, ODD, [b""] * len(ODD), ODD_STEP)


def with_odd(reference: dict) -> dict:
    return {**reference, (ODD_TAG, ODD_STEP): ODD}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """What a tracker must hold: {(tag, step): [pixels]} and {tag: [(step, value), ...]}, from the PNG-folder
    run (no tracker). The PNG folder has one file per sample; a logger gets one picture per check and tag,
    the samples' panels stacked in it (`stack_panels`), which is rebuilt here from those files."""
    root = tmp_path_factory.mktemp("reference")
    logger = CSVLogger(root, name="run")
    fit(root, logger)
    pictures = {
        (tag, step): [pixels(p) for p in pngs]
        for tag in (*STACKED, *SINGLE)
        for step, pngs in read_images(logger.log_dir, tag)
    }
    scalars = {tag: read_scalars(logger.log_dir, tag) for tag in FRACTIONS}
    assert sorted(pictures) == [
        ("peering/confused", 2),
        ("peering/confused", 4),
        ("peering/confused_pairs", 4),
        ("peering/confusion_matrix", 4),
        ("peering/val/confused", 4),
    ]
    assert len(pictures[("peering/confused", 2)]) == 2 and len(pictures[("peering/confusion_matrix", 4)]) == 1
    assert [s for s, _ in scalars["peering/confused_fraction"]] == [2, 4]
    logged = {
        (tag, step): [stack_panels(np.stack(panels))[0]] if tag in STACKED else panels
        for (tag, step), panels in pictures.items()
    }
    return logged, scalars


def assert_same_pictures(got: dict, reference: dict) -> None:
    assert sorted(got) == sorted(reference)
    for key, images in reference.items():
        assert len(got[key]) == len(images), key
        for a, b in zip(got[key], images, strict=True):
            assert a.shape == b.shape and np.array_equal(a, b), f"{key}: the pixels differ"


# ------------------------------------------------------------------------------------------------- W&B


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (``run-<id>.wandb``: LevelDB-log framing, 32 KiB blocks, a
    7-byte ``:W&B`` header); wandb >= 0.19 no longer ships a Python reader for its own files."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline(reference, tmp_path, monkeypatch):
    wandb = need("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=tmp_path, offline=True, project="peering-tests")
    assert [type(s).__name__ for s in image_sinks([logger])] == ["WandbSink"]
    try:
        fit(tmp_path, logger)
        log_odd(logger)
    finally:
        wandb.finish()
        wandb.teardown()
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    files = Path(run_file).parent / "files"
    pictures, scalars = defaultdict(list), defaultdict(list)
    for record in wandb_records(Path(run_file)):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {
            item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
        }
        step = row["trainer/global_step"]
        for tag in TAGS:
            if f"{tag}/filenames" in row:
                assert row[f"{tag}/_type"] == "images/separated"
                pictures[(tag, step)] += [
                    pixels((files / name).read_bytes()) for name in row[f"{tag}/filenames"]
                ]
        for tag in FRACTIONS:
            if tag in row:
                scalars[tag].append((step, row[tag]))
    assert_same_pictures(pictures, with_odd(reference[0]))
    assert dict(scalars) == reference[1]


# ---------------------------------------------------------------------------------------------- MLflow


def test_mlflow_local_file_store(reference, tmp_path, monkeypatch):
    need("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    # MLflow >= 3.x refuses the file store unless asked (it wants a database); a local SQLite store works
    # too, the same way, but takes seconds to create its tables.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(experiment_name="peering", tracking_uri=uri)
    assert [type(s).__name__ for s in image_sinks([logger])] == ["MLflowSink"]
    fit(tmp_path, logger)
    log_odd(logger)
    client = MlflowClient(tracking_uri=uri)
    found = []
    for artifact in client.list_artifacts(logger.run_id, "images"):
        name = Path(artifact.path).name  # <key with / as ~>+step+<n>+timestamp+<ms>+<uuid>.png
        if not name.endswith(".png"):
            continue  # MLflow also stores a compressed .webp thumbnail of each image
        key, _, step, _, stamp, _ = name[: -len(".png")].split("+")
        local = client.download_artifacts(logger.run_id, artifact.path, str(tmp_path / "download"))
        found.append((key.replace("~", "/"), int(step), int(stamp), pixels(Path(local).read_bytes())))
    pictures = defaultdict(list)
    for tag, step, _, image in sorted(found, key=lambda f: f[:3]):
        if tag in TAGS:
            pictures[(tag, step)].append(image)
    assert_same_pictures(pictures, with_odd(reference[0]))
    for tag, values in reference[1].items():
        assert [(m.step, m.value) for m in client.get_metric_history(logger.run_id, tag)] == values


# ----------------------------------------------------------------------------------------------- Comet


COMET_QUIET = {
    "log_code": False,
    "log_git_metadata": False,
    "log_git_patch": False,
    "log_env_details": False,
    "log_env_host": False,
    "log_env_cpu": False,
    "log_env_gpu": False,
    "log_env_network": False,
    "log_env_disk": False,
    "auto_output_logging": False,
    "display_summary_level": 0,
}


def test_comet_loggers_online_false_records_nothing(tmp_path, monkeypatch):
    """Lightning 2.6's CometLogger turns ``online=False`` into comet's ``disabled=True``: an offline
    experiment that writes nothing at all (the README's limits table says so)."""
    need("comet_ml")
    from lightning.pytorch.loggers import CometLogger

    monkeypatch.setenv("COMET_DISABLE_AUTO_LOGGING", "1")
    monkeypatch.setenv("COMET_ERROR_TRACKING_ENABLE", "false")  # no reports to sentry.io
    logger = CometLogger(online=False, offline_directory=str(tmp_path), project="peering", **COMET_QUIET)
    assert type(logger.experiment).__name__ == "OfflineExperiment" and logger.experiment.disabled
    fit(tmp_path, logger)
    logger.experiment.end()
    assert not list(tmp_path.glob("*.zip"))


def test_comet_offline(reference, tmp_path, monkeypatch):
    need("comet_ml")
    from lightning.pytorch.loggers import CometLogger

    monkeypatch.setenv("COMET_DISABLE_AUTO_LOGGING", "1")
    monkeypatch.setenv("COMET_ERROR_TRACKING_ENABLE", "false")  # no reports to sentry.io
    monkeypatch.setenv("COMET_START_ONLINE", "false")  # offline without Lightning's online=False (above)
    logger = CometLogger(offline_directory=str(tmp_path / "comet"), project="peering", **COMET_QUIET)
    assert type(logger.experiment).__name__ == "OfflineExperiment" and not logger.experiment.disabled
    assert [type(s).__name__ for s in image_sinks([logger])] == ["CometSink"]
    fit(tmp_path, logger)
    log_odd(logger)
    logger.experiment.end()
    (archive,) = (tmp_path / "comet").glob("*.zip")  # what `comet upload` sends
    pictures, scalars = defaultdict(list), defaultdict(list)
    with zipfile.ZipFile(archive) as z:
        for line in z.read("messages.json").decode().splitlines():
            message = json.loads(line)
            payload = message["payload"]
            if message["type"] == "file_upload" and "figName" in payload.get("additional_params", {}):
                params = payload["additional_params"]
                tag, _, name = params["figName"].rpartition("/")  # <tag>/step_<n>_<i>
                if tag in TAGS:
                    pictures[(tag, params["step"])].append((name, pixels(z.read(payload["file_path"]))))
            elif message["type"] == "metric_msg" and payload["metric"]["metricName"] in FRACTIONS:
                metric = payload["metric"]
                scalars[metric["metricName"]].append((metric["step"], float(metric["metricValue"])))
    ordered = {
        k: [im for _, im in sorted(v, key=lambda n: int(n[0].rsplit("_", 1)[1]))] for k, v in pictures.items()
    }
    assert_same_pictures(ordered, with_odd(reference[0]))
    assert dict(scalars) == reference[1]


# --------------------------------------------------------------------------------------------- Neptune


def test_lightnings_neptune_loggers_do_not_run(tmp_path):
    """Lightning 2.6's NeptuneLogger only raises; the neptune package's re-export of it cannot be imported."""
    need("neptune")
    import subprocess
    import sys

    from lightning.pytorch.loggers.neptune import NeptuneLogger

    with pytest.raises(RuntimeError, match="NeptuneLogger is no longer supported. Neptune has been sunset."):
        NeptuneLogger(mode="offline")
    # in a child process: importing it imports the old `pytorch_lightning` package, which re-points
    # Lightning's shared rank-zero logger at its own, for the rest of the process
    child = subprocess.run(
        [sys.executable, "-c", "import neptune.integrations.pytorch_lightning"],
        capture_output=True,
        text=True,
    )
    assert child.returncode != 0
    assert "ImportError: cannot import name 'NeptuneLogger' from 'pytorch_lightning.loggers'" in child.stderr


def neptune_operations(root: Path):
    """The operations of neptune's offline run(s) under ``root/.neptune/offline``, through neptune's own
    disk queue (what ``neptune sync`` uploads)."""
    import threading

    from neptune.core.components.queue.disk_queue import DiskQueue
    from neptune.internal.operation import Operation

    for folder in sorted((root / ".neptune" / "offline").iterdir()):
        queue = DiskQueue(folder, lambda op: op.to_dict(), Operation.from_dict, threading.RLock())
        try:
            while (element := queue.get()) is not None:
                yield element.obj
        finally:
            queue.close()


def test_neptune_sink_on_a_real_offline_run(reference, tmp_path, monkeypatch):
    neptune = need("neptune")
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)  # neptune writes .neptune/ in the working directory
    run = neptune.init_run(
        mode="offline",
        project="peering/tests",
        capture_hardware_metrics=False,
        capture_stdout=False,
        capture_stderr=False,
        capture_traceback=False,
        source_files=[],
        git_ref=False,
    )
    sink = NeptuneSink(SimpleNamespace(experiment=run))  # the Lightning logger's .experiment is such a run
    for (tag, step), images in sorted(with_odd(reference[0]).items(), key=lambda kv: (kv[0][1], kv[0][0])):
        sink.log_images(tag, images, [b""] * len(images), step)
    run.stop()
    series = defaultdict(list)
    for op in neptune_operations(tmp_path):
        if type(op).__name__ == "LogImages":
            import base64

            for value in op.values:
                series["/".join(op.path)].append((value.step, pixels(base64.b64decode(value.value.data))))
    # Neptune series need strictly increasing steps: one picture per step goes to the tag's series, several
    # in one write (the ODD pictures) to one series per picture index, <tag>/<i>
    for name, values in series.items():
        steps = [s for s, _ in values]
        assert steps == sorted(set(steps)), f"{name}: steps {steps} are not strictly increasing"
    assert sorted(series) == sorted([*{tag for tag, _ in reference[0]}, f"{ODD_TAG}/0", f"{ODD_TAG}/1"])
    pictures = defaultdict(list)
    for name, values in sorted(series.items()):
        tag = name.rsplit("/", 1)[0] if name.startswith(ODD_TAG + "/") else name
        for step, image in values:
            pictures[(tag, int(step))].append(image)
    assert_same_pictures(pictures, with_odd(reference[0]))
