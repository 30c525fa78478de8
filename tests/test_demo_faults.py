"""``peering demo --faults``: 10% flipped labels and a patch on the training 3s, planted in the demo's
MNIST data, are found by `LabelIssues` and `ShortcutAlarm` while the demo trains, and the report shows
both sections."""

from __future__ import annotations

import pytest

from peering.demo import run_demo
from peering.demo.faults import PATCH_CLASS
from peering.errors import PeeringValueError
from peering.runs import read_run_json


def test_faults_need_mnist(tmp_path):
    with pytest.raises(PeeringValueError, match="--faults needs --dataset mnist"):
        run_demo(tmp_path, "f", dataset="digits", faults=True, progress=False, morph_digits=0,
                 sanity_digits=0)


@pytest.mark.slow
def test_both_faults_are_found_and_reported(mnist_dir, tmp_path):
    result = run_demo(tmp_path, "f", dataset="mnist", data_dir=mnist_dir, faults=True, progress=False,
                      morph_digits=0, sanity_digits=0)
    faults = read_run_json(result.run_dir)["faults"]
    assert faults["flipped"] == 800
    assert faults["precision_at_flips"] > 0.9  # measured: 0.97
    assert faults["caught_class"]
    assert {a["class"] for a in faults["alarms"]} == {PATCH_CLASS}  # no other class named
    assert min(a["epoch"] for a in faults["alarms"]) <= 3
    page = result.report.read_text()
    assert 'id="labels"' in page and 'id="shortcuts"' in page
    assert "the model says" in page and f"Class {PATCH_CLASS} (" in page
