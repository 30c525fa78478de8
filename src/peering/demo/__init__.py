"""The demo behind `peering demo`: train, watch what confuses the model, morph digits, check, report.

- `peering.demo.pipeline`: `run_demo` (the whole run, step by step) and the `DemoResult` it returns;
- `peering.demo.data`: the demo's split (`load_demo_data`) and the digits a run trained on (`training_data`);
- `peering.demo.morphs`: the morphs, the judges and `morph_view`;
- `peering.demo.sanity`: the randomisation sanity check with its pictures;
- `peering.demo.interrupt`: Ctrl+C handled at safe points;
- `peering.demo.tensorboard`: the command that shows a run in TensorBoard.

The library never imports the demo. File names of the run folder are in `peering.runs.names`.

>>> from peering.demo import DEFAULT_EPOCHS
>>> DEFAULT_EPOCHS["digits"]
10
"""

from peering._files import write_json_atomic
from peering.demo.data import DEFAULT_EPOCHS, load_demo_data, training_data
from peering.demo.morphs import morph_view
from peering.demo.pipeline import DemoResult, run_demo
from peering.demo.tensorboard import tensorboard_command
from peering.runs.names import (
    CHECKPOINT_FILE,
    LOG_DIR,
    MORPH_DIR,
    PORTRAITS_FILE,
    REPORT_FILE,
    RUN_FILE,
    SANITY_DIR,
)

__all__ = [
    "CHECKPOINT_FILE",
    "DEFAULT_EPOCHS",
    "LOG_DIR",
    "MORPH_DIR",
    "PORTRAITS_FILE",
    "REPORT_FILE",
    "RUN_FILE",
    "SANITY_DIR",
    "DemoResult",
    "load_demo_data",
    "morph_view",
    "run_demo",
    "tensorboard_command",
    "training_data",
    "write_json_atomic",
]
