"""`peering.lightning.process_group.destroy_at_exit`, in real processes with a real Gloo process group."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import atexit, sys
    import torch.distributed as dist
    from peering.lightning.process_group import destroy_at_exit

    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    # atexit runs the last registered first: this one sees what destroy_at_exit's handler left
    atexit.register(lambda: print("initialised at exit:", dist.is_initialized(), flush=True))
    if sys.argv[2] == "register":
        destroy_at_exit()
        destroy_at_exit()  # once per process
    print("registered", flush=True)
""")


def _run(tmp_path: Path, mode: str) -> str:
    tmp_path.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "store"), mode], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_process_group_is_destroyed_before_the_interpreter_exits(tmp_path):
    assert "initialised at exit: False" in _run(tmp_path, "register")
    # without it, the group is still alive when the interpreter winds down (what made Gloo ranks abort)
    assert "initialised at exit: True" in _run(tmp_path / "other", "none")
