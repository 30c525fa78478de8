"""The command line starts fast: each command imports torch, Lightning, matplotlib, TensorBoard and
transformers only when it needs them (the times themselves are in docs/real_size.md, measured with
``python -X importtime``; a test asserts what is imported, never how long it took)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from PIL import Image

import peering

SRC = str(Path(peering.__file__).resolve().parents[1])
HEAVY = ("torch", "lightning", "matplotlib", "tensorboard", "transformers", "torchmetrics")

_RUN = textwrap.dedent("""
    import json, sys
    from peering.cli import main
    sys.argv = ["peering", *{argv!r}]
    try:
        main()
    except SystemExit as done:
        code = done.code
    else:
        code = 0
    heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))
    print(json.dumps({{"code": code, "heavy": heavy}}))
""")

_NET = textwrap.dedent("""
    from torch import nn


    def make():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 10))
""")


def _imports(argv: list[str], cwd: Path) -> dict:
    code = _RUN.format(argv=argv, heavy=HEAVY)
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=cwd)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_imports_none_of_the_heavy_libraries(tmp_path):
    assert _imports(["--help"], tmp_path) == {"code": 0, "heavy": []}
    assert _imports(["explain", "--help"], tmp_path) == {"code": 0, "heavy": []}


def test_explain_with_a_state_dict_model_imports_torch_only(tmp_path):
    """A user's model file and its weights: no Lightning, matplotlib, TensorBoard or transformers."""
    (tmp_path / "net.py").write_text(_NET)
    sys.path.insert(0, str(tmp_path))
    try:
        import net

        torch.save(net.make().state_dict(), tmp_path / "weights.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("net", None)
    Image.new("L", (12, 12), 40).save(tmp_path / "digit.png")
    argv = ["explain", "weights.pt", "digit.png", "--model", "net.py:make", "-o", "out.png"]
    assert _imports(argv, tmp_path) == {"code": 0, "heavy": ["torch"]}
    assert (tmp_path / "out.png").stat().st_size > 0
