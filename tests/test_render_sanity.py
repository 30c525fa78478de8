"""The sanity check's pictures, from a real check of the digits CNN, checked pixel by pixel; the demo's
sanity step and the report's "Sanity check" section."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from peering.checks.sanity import randomisation_check
from peering.render import _draw, diverging, sanity_curves, sanity_maps, to_rgb
from peering.report import build_report

PAD, GAP = _draw._PAD, _draw._GAP


@pytest.fixture(scope="module")
def result(digits_cnn, digits_split):
    return randomisation_check(digits_cnn, digits_split[2][:8], methods=["gradient", "input_x_gradient"])


def tile(rows: torch.Tensor, t: int, n_tiles: int, h: int, w: int) -> torch.Tensor:
    """Tile t of panel rows [N, H', W', 3]: tiles at the bottom of each row, centred in equal cells
    ``GAP`` apart, ``PAD`` from the edges."""
    step = (rows.shape[2] - 2 * PAD + GAP) // n_tiles
    x0 = PAD + t * step + (step - GAP - w) // 2
    y0 = rows.shape[1] - PAD - h
    return rows[:, y0 : y0 + h, x0 : x0 + w]


def zoomed(x: torch.Tensor, zoom: int) -> torch.Tensor:
    return x.repeat_interleave(zoom, -3).repeat_interleave(zoom, -2)


def test_sanity_maps_show_the_input_then_each_steps_map_on_its_own_scale(result):
    image = sanity_maps(result, "gradient", zoom=3)
    assert image.mode == "RGB"
    n, columns = 4, 2 + len(result.layers)  # input, trained, one per step
    rows = torch.from_numpy(np.array(image))
    assert rows.shape[0] % n == 0
    rows = rows.view(n, rows.shape[0] // n, rows.shape[1], 3)
    assert torch.equal(tile(rows, 0, columns, 24, 24), zoomed(to_rgb(result.example_inputs), 3))
    for step in range(len(result.layers) + 1):
        maps = result.examples["gradient"][step]  # [n, 1, 8, 8]
        expected = zoomed(diverging(maps[:, 0]), 3)  # each map to its own max |value|
        assert torch.equal(tile(rows, step + 1, columns, 24, 24), expected), step
    # column headings on the first row only; every map's scale under it on every row
    line = _draw._band_height(_draw._font()[0])
    assert (rows[0, PAD : PAD + line] < 128).any() and not (rows[1, PAD : PAD + line] < 128).any()
    assert (rows[:, PAD + line : PAD + 2 * line] < 128).any(dim=(1, 2, 3)).all()
    with pytest.raises(ValueError, match="no example maps for 'smoothgrad'"):
        sanity_maps(result, "smoothgrad")


def test_sanity_curves_draw_one_line_per_method(result):
    image = sanity_curves(result)
    assert image.size == (640, 400) and image.mode == "RGB"
    pixels = np.asarray(image).reshape(-1, 3)
    colours = {tuple(p) for p in pixels[::7]}
    for hex_colour in ("#1f77b4", "#ff7f0e"):  # the two methods' lines
        rgb = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
        assert rgb in colours, hex_colour
    assert (pixels < 60).all(axis=1).sum() > 500  # axes, ticks and text


# ----------------------------------------------------------------------------------- the demo and report


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs["alt"])

    def handle_data(self, data):
        self.text.append(data)


@pytest.mark.slow
def test_the_demo_runs_the_check_and_the_report_shows_it(tmp_path):
    from peering.demo import run_demo

    result = run_demo(tmp_path, "sane", epochs=3, track=0, morph_digits=0, sanity_digits=12, progress=False)
    sanity = json.loads((result.run_dir / "run.json").read_text())["sanity"]
    assert sanity == result.sanity
    assert sanity["samples"] == 12 and sanity["layers"] == ["fc2", "fc1", "conv2", "conv1"]
    assert sorted(sanity["methods"]) == ["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad"]
    for name, numbers in sanity["methods"].items():
        assert len(numbers["correlation"]) == 4 and numbers["passed"] in (True, False), name
        with Image.open(result.run_dir / sanity["maps"][name]) as maps:
            assert maps.width > maps.height / 2
    with Image.open(result.run_dir / sanity["curves"]) as curves:
        assert curves.size == (640, 400)

    page = _Page()
    page.feed(result.report.read_text(encoding="utf-8"))
    assert page.sections[-1] == "sanity"
    text = " ".join(" ".join(page.text).split())
    assert "Sanity check" in text and "12 held-out digits" in text
    for name, numbers in sanity["methods"].items():
        verdict = "passes" if numbers["passed"] else "fails"
        cells = " ".join(f"{v:.2f}" for v in numbers["correlation"])
        assert re.search(rf"{name} {cells} {numbers['unrelated']:.2f} {verdict}", text), name
    assert sum(alt.startswith("example maps of") for alt in page.images) == 4
    assert any(alt.startswith("rank correlation per method") for alt in page.images)

    # a picture gone missing is said, not silently dropped; a run without the check has no section
    (result.run_dir / sanity["maps"]["gradient"]).unlink()
    rebuilt = build_report(result.run_dir, tmp_path / "again.html").read_text(encoding="utf-8")
    assert "Missing picture: sanity/maps_gradient.png" in rebuilt
    summary = json.loads((result.run_dir / "run.json").read_text())
    summary["sanity"] = None
    (result.run_dir / "run.json").write_text(json.dumps(summary))
    without = build_report(result.run_dir, tmp_path / "without.html").read_text(encoding="utf-8")
    assert 'id="sanity"' not in without and 'id="summary"' in without
