"""`peering explain-dataset` as real jobs meet it, run as the installed command in real processes with real
signals: SIGTERM and SIGINT stop at the next batch and a rerun resumes; killing the command leaves no
worker behind; one run at a time writes into a folder; a rerun re-verifies what it skips and never turns a
finished run into an unfinished one; `--devices 2` imports the user's own model file; `peering report` on a
run killed before its first shard is one line. Every wait is bounded.

The user's model sleeps a little in each forward pass, so that a run on the 1,797 digits lasts long enough
to be signalled in the middle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import peering
from peering.store import SHARDS

pytestmark = pytest.mark.slow

PEERING = Path(sys.executable).parent / "peering"
DIGITS = 1797

SLOW_MODEL = """
import time

from torch import nn


class Slow(nn.Module):
    \"\"\"A small MLP on 8x8 digits that sleeps in each forward pass (a model that takes its time).\"\"\"

    def __init__(self, delay=0.0):
        super().__init__()
        self.delay = delay
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        time.sleep(self.delay)
        return self.net(x)


def make():
    return Slow(delay=0.1)
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A folder with the user's model file (``slow_model.py``) and its weights (``weights.pt``)."""
    if not PEERING.exists():
        pytest.skip(f"console script not installed at {PEERING} (pip install -e .)")
    folder = tmp_path_factory.mktemp("job")
    (folder / "slow_model.py").write_text(SLOW_MODEL)
    namespace: dict = {}
    exec(SLOW_MODEL, namespace)  # noqa: S102  # the same module the command imports, to save its weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(namespace["make"]().state_dict(), folder / "weights.pt")
    return folder


def command(job: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(PEERING), "explain-dataset", "weights.pt", "--model", "slow_model.py:make", "--data",
        "digits", "--out", str(out), "--batch-size", "16", "--no-progress", *extra,
    ]  # fmt: skip


def start(job: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
    )  # fmt: skip


def run(job: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=job, capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300, what: str = "") -> None:
    """Poll until ``predicate()`` holds; fail (with the process's output) if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the command ended (exit {process.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            stop(process, signal.SIGKILL)
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.05)


def stop(process: subprocess.Popen, signum: int, timeout: float = 60) -> tuple[str, str]:
    """Send ``signum`` and wait for the exit; on a hang, print every thread's stack (faulthandler)."""
    process.send_signal(signum)
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        out, err = process.communicate(timeout=30)
        pytest.fail(f"no exit {timeout} s after signal {signum}; its threads:\n{err[-8000:]}")


def started(out: Path):
    """True once the run has written its manifest (it is past loading and into Trainer.predict)."""
    return lambda: (out / "manifest.json").is_file()


def descendants(pid: int) -> set[int]:
    """The live processes below ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        children = {p for p, parent in parents.items() if parent in frontier} - found
        found |= children
        frontier = children
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_one_resume_line(err: str, signame: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, err
    assert lines[-1].startswith(f"interrupted by {signame}: "), err
    assert "rerun the same command to resume" in lines[-1]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_the_next_batch_and_the_rerun_resumes(job, tmp_path, signum, code):
    out = tmp_path / "run"
    process = start(job, command(job, out))
    wait_for(started(out), process, what="the run started")
    time.sleep(1.5)  # some batches in (a batch takes at least 0.1 s: the run at least 11 s)
    sent = time.monotonic()
    _, err = stop(process, signum)
    assert process.returncode == code, err
    assert time.monotonic() - sent < 30, "the run did not stop at the next batch"
    assert_one_resume_line(err, signal.Signals(signum).name)
    written = peering.load_attributions(out, allow_incomplete=True)
    assert 0 < len(written) < DIGITS, len(written)
    assert f"{len(written):,} of {DIGITS:,} samples are written" in err

    again = run(job, command(job, out))
    assert again.returncode == 0, again.stderr
    assert f"{len(written):,} were already done" in again.stdout
    assert "were verified" in again.stdout
    done = peering.load_attributions(out)
    assert done.indices.tolist() == list(range(DIGITS))


def test_two_devices_import_the_users_model_file_and_resume_after_sigterm(job, tmp_path):
    """`--devices 2 --model slow_model.py:make`: the spawned workers import the user's file; SIGTERM to
    the command alone stops both workers (143), and the rerun holds each sample exactly once."""
    out = tmp_path / "run"
    process = start(job, command(job, out, "--devices", "2"))
    wait_for(started(out), process, what="the workers started")
    assert len(descendants(process.pid)) >= 2
    time.sleep(1.5)
    _, err = stop(process, signal.SIGTERM, timeout=90)
    assert process.returncode == 143, err
    assert_one_resume_line(err, "SIGTERM")
    assert "ModuleNotFoundError" not in err
    written = peering.load_attributions(out, allow_incomplete=True)
    assert len(written) < DIGITS

    again = run(job, command(job, out, "--devices", "2"), timeout=400)
    assert again.returncode == 0, again.stderr
    assert "ModuleNotFoundError" not in again.stderr
    done = peering.load_attributions(out)
    assert sorted(done.indices.tolist()) == list(range(DIGITS))


def test_killing_the_command_leaves_no_worker_and_no_lock(job, tmp_path):
    """SIGKILL to the command (a scheduler's last word): its workers die with it, nothing goes on writing,
    and the next run takes the folder."""
    out = tmp_path / "run"
    process = start(job, command(job, out, "--devices", "2"))
    wait_for(started(out), process, what="the workers started")
    workers = descendants(process.pid)
    assert len(workers) >= 2
    time.sleep(1.0)
    stop(process, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if alive(p)], "workers outlived the command"
    shards = sorted((out / SHARDS).glob("*.safetensors")) if (out / SHARDS).is_dir() else []
    sizes = [p.stat().st_size for p in shards]
    time.sleep(1.0)
    assert [p.stat().st_size for p in shards] == sizes  # nothing is writing any more

    again = run(job, command(job, out), timeout=300)  # the folder is free again: the rerun resumes
    assert again.returncode == 0, again.stderr
    assert sorted(peering.load_attributions(out).indices.tolist()) == list(range(DIGITS))


def test_a_second_writer_is_refused_with_the_holders_pid(job, tmp_path):
    out = tmp_path / "run"
    first = start(job, command(job, out))
    try:
        wait_for(started(out), first, what="the first run started")
        second = run(job, command(job, out, "--batch-size", "32"))
        assert second.returncode == 2, second.stderr
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr
        assert f"in use by process {first.pid}" in lines[0]
        assert first.poll() is None  # the first run goes on
    finally:
        _, err = stop(first, signal.SIGTERM)
    assert first.returncode in (0, 143), err


def test_report_of_a_run_killed_before_its_first_shard_is_one_line(job, tmp_path):
    out = tmp_path / "run"
    process = start(job, command(job, out))
    wait_for(started(out), process, what="the run started")
    stop(process, signal.SIGKILL)
    assert not list((out / SHARDS).glob("*.safetensors")) if (out / SHARDS).is_dir() else True
    result = subprocess.run([str(PEERING), "report", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no samples written yet" in lines[0], result.stderr


def test_a_rerun_reverifies_the_shards_it_skips_and_never_downgrades_a_finished_run(job, tmp_path):
    out = tmp_path / "run"
    first = run(job, command(job, out))
    assert first.returncode == 0, first.stderr
    manifest = (out / "manifest.json").read_bytes()

    # a no-op rerun killed midway leaves the finished run as it was
    process = start(job, command(job, out))
    wait_for(lambda: True, process)
    time.sleep(2.0)
    stop(process, signal.SIGKILL)
    assert (out / "manifest.json").read_bytes() == manifest
    assert len(peering.load_attributions(out)) == DIGITS

    # one flipped bit in a shard's attributions: the rerun names the shard instead of skipping its samples
    shard = sorted((out / SHARDS).glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 1
    shard.write_bytes(bytes(data))
    checked = run(job, command(job, out))
    assert checked.returncode == 2, checked.stderr
    assert shard.name in checked.stderr and "Traceback" not in checked.stderr
    unchecked = run(job, command(job, out) + ["--no-verify"])
    assert unchecked.returncode == 0, unchecked.stderr
    assert "were not verified (--no-verify); pass --verify to check them" in unchecked.stdout
    assert (out / "manifest.json").read_bytes() == manifest


SLOW_LOADING = """
import pathlib
import time

from torch import nn


def make():
    \"\"\"A model whose factory takes its time (a large model being built), saying when it began.\"\"\"
    pathlib.Path("loading").write_text("")
    time.sleep(60)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
"""


def test_sigterm_while_the_model_loads_is_one_line_and_exit_143(job, tmp_path):
    (job / "slow_loading.py").write_text(SLOW_LOADING)
    (job / "loading").unlink(missing_ok=True)
    out = tmp_path / "run"
    args = command(job, out)
    args[args.index("slow_model.py:make")] = "slow_loading.py:make"
    process = start(job, args)
    wait_for(lambda: (job / "loading").exists(), process, what="the model factory to start")
    _, err = stop(process, signal.SIGTERM, timeout=30)
    assert process.returncode == 143, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [f"interrupted by SIGTERM before the run started; no sample was written to {out}"], err
