"""The static HTML report: its structure, escaping, the PNG-folder layout, and a real headless Chromium.

The browser test needs Debian's ``chromium`` (CI installs it); without it that test is skipped with a
message. It saves a screenshot of the report as ``test-artifacts/report.png``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from peering.demo import run_demo
from peering.lightning import ConfusedLogitCallback
from peering.models import DigitClassifier
from peering.render._draw import _FONT_SIZE
from peering.report import SECTIONS, ReportError, build_report, find_log_dir
from tests._chromium import FLAGS as CHROMIUM_FLAGS
from tests._chromium import find_chromium

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


class _Page(HTMLParser):
    """Collects the tags (with attributes) and the text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for t, attrs in self.tags if t == tag]


def allow_inline_script(html: str) -> str:
    """The page with its Content-Security-Policy also allowing one inline checking script (images stay
    restricted to data: URIs exactly as in the original)."""
    html, found = re.subn(
        r'(<meta http-equiv="Content-Security-Policy" content=")([^"]*)(">)',
        lambda m: m.group(1) + m.group(2) + "; script-src &#x27;unsafe-inline&#x27;" + m.group(3),
        html,
        count=1,
    )
    assert found == 1
    return html


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A small demo run (2 epochs on the digits), made through the Python API."""
    out = tmp_path_factory.mktemp("runs")
    result = run_demo(out, "report", epochs=2, track=2, morph_digits=2, morph_steps=60, progress=False)
    return result.run_dir


# every section but the dataset attributions of `peering explain-dataset` (tests/test_cli_dataset.py) and
# what LabelIssues and ShortcutAlarm found (`peering demo --faults`, tests/test_demo_faults.py)
TRAINING_SECTIONS = [s for s in SECTIONS if s not in ("dataset", "labels", "shortcuts")]


# ------------------------------------------------------------------------------------------- structure


def test_report_has_every_section_and_only_embedded_images(demo_run):
    report = demo_run / "report.html"
    page = parse(report)
    ids = [attrs.get("id") for tag, attrs in page.tags if tag == "section"]
    assert ids == TRAINING_SECTIONS
    images = page.all("img")
    summary = json.loads((demo_run / "run.json").read_text())
    assert all(m.get("gif") for m in summary["morphs"])
    # training and validation pictures of 2 epochs, 2 tracked samples x 2 epochs, one strip per morph
    assert len(images) >= 2 + 2 * 2 + len(summary["morphs"])
    formats = []
    for attrs in images:
        src = attrs["src"]
        assert src.startswith(("data:image/png;base64,", "data:image/gif;base64,"))
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == src[11:14].upper() and im.width > 0 and im.height > 0
            formats.append((im.format, getattr(im, "n_frames", 1)))
        assert attrs.get("alt")
    # every morph's animation is embedded (the page is one file that can be mailed), and it moves
    gifs = [frames for fmt, frames in formats if fmt == "GIF"]
    assert len(gifs) == len(summary["morphs"]) and all(frames > 1 for frames in gifs)
    # no network and no server: nothing is fetched from anywhere; the CSP forbids it anyway
    html = report.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert not re.search(r"<(script|link|iframe)\b", html)
    csp = [a for a in page.all("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    # no link leaves the page: the only links are to its own sections
    assert all(attrs["href"].startswith("#") for attrs in page.all("a"))
    text = " ".join(page.text)
    assert "Test accuracy" in text and f"{summary['test_accuracy']:.2%}" in text
    assert re.search(r"Epoch 0.*Epoch 1", text, re.S)
    assert "Sample 0" in text and "Sample 1" in text
    for m in summary["morphs"]:
        assert f"{m['label']} → {m['target']}" in text
    # the judges' table (plain ascent and the defaults with the data prior) and the row of portraits
    judged = summary["judges"]["morphs"]
    assert all(row["method"] in text for row in judged)
    for row in judged:
        for name, rate in row["agreement"].items():
            assert f"{rate:.1%}" in text, (name, rate)
    assert any(attrs.get("alt") == "class portraits, one per class" for attrs in images)


def test_summary_table_matches_the_event_files(demo_run):
    from peering.lightning import read_scalars

    val_acc = [v for _, v in read_scalars(demo_run / "logs", "val_acc")]
    page = parse(demo_run / "report.html")
    text = " ".join(page.text)
    for value in val_acc:
        assert f"{value:.2%}" in text
    assert "<svg" in (demo_run / "report.html").read_text()


def test_rebuilding_gives_the_same_sections(demo_run, tmp_path):
    again = build_report(demo_run, tmp_path / "again.html")
    first, second = parse(demo_run / "report.html"), parse(again)
    assert len(first.all("img")) == len(second.all("img"))
    assert [a["src"] for a in first.all("img")] == [a["src"] for a in second.all("img")]


def test_all_text_is_escaped(demo_run, tmp_path):
    run = tmp_path / "evil"
    shutil.copytree(demo_run, run)
    summary = json.loads((run / "run.json").read_text())
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    summary["described"] = evil
    summary["title"] = evil
    summary["morphs"][0]["kind"] = evil
    (run / "run.json").write_text(json.dumps(summary))
    html = build_report(run).read_text()
    assert "<script" not in html
    assert re.search(r"&lt;script&gt;alert\((&quot;|&#34;)x(&quot;|&#34;)\)&lt;/script&gt;", html)
    page = parse(run / "report.html")
    assert not page.all("script")
    assert not any("onerror" in attrs for _, attrs in page.tags)
    assert all(
        a["src"].startswith(("data:image/png;base64,", "data:image/gif;base64,")) for a in page.all("img")
    )
    assert evil in " ".join(page.text)  # shown as text, exactly


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_report_of_a_png_folder_run_without_a_logger(tmp_path, digits_split):
    """A Lightning run with no logger: the callback writes PNGs and scalars.csv, which the report reads."""
    train_x, train_y, test_x, test_y = digits_split
    callback = ConfusedLogitCallback(
        top_k=2,
        logging_batch_interval=4,
        max_logit_difference=5.0,
        min_logit_value=None,
        track=1,
        background=False,
    )
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        callbacks=[callback],
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_train_batches=8,
        limit_val_batches=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        trainer.fit(
            DigitClassifier(image_size=8),
            DataLoader(TensorDataset(train_x, train_y), batch_size=32),
            DataLoader(TensorDataset(test_x, test_y), batch_size=64),
        )
    assert find_log_dir(tmp_path) == tmp_path
    page = parse(build_report(tmp_path))
    text = " ".join(page.text)
    assert "Confused samples per epoch" in text and "Sample 0" in text
    assert "No film strips" in text
    assert len(page.all("img")) >= 2 + 2  # training pictures and the tracked sample at two epochs


def test_report_errors(tmp_path):
    with pytest.raises(ReportError, match="run folder not found"):
        build_report(tmp_path / "missing")
    with pytest.raises(ReportError, match="holds no run"):
        build_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


# ---------------------------------------------------------------------------------------------- browser

_CHECK = """
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (im) { return !(im.complete && im.naturalWidth > 0); })
                     .map(function (im) { return im.alt; });
  var sections = Array.prototype.map.call(document.querySelectorAll("section[id]"), function (s) {
    return s.id;
  });
  var out = document.createElement("pre");
  out.id = "peering-check";
  out.textContent = JSON.stringify({images: images.length, broken: broken, sections: sections,
                                    width: document.documentElement.scrollWidth,
                                    window: window.innerWidth,
                                    section: document.querySelector("section").getBoundingClientRect().width,
                                    captions: Array.prototype.map.call(
                                      document.querySelectorAll("figcaption"),
                                      function (c) { return parseFloat(getComputedStyle(c).fontSize); }),
                                    drawn: images.filter(function (im) {  // shown (a stepper's hidden
                                        // frames have no box until chosen; they are drawn the same way)
                                        return im.naturalWidth > 0 && im.getBoundingClientRect().width > 0;
                                      })
                                      .map(function (im) {
                                        return im.getBoundingClientRect().width / im.naturalWidth;
                                      })});
  document.body.appendChild(out);
});
</script>
"""


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_in_headless_chromium(demo_run, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not found: install Debian's chromium package (`apt-get install chromium`)")
    report = demo_run / "report.html"
    expected_images = len(parse(report).all("img"))

    # a copy in another, empty folder (as if mailed on its own: nothing beside it) whose CSP also allows one
    # inline checking script; images stay restricted to data: URIs exactly as in the original
    alone = tmp_path / "mailed"
    alone.mkdir()
    checked = alone / "report.html"
    html = report.read_text(encoding="utf-8")
    html = allow_inline_script(html)
    # two controls that must be reported broken: a corrupt data: image, and a real PNG file that the page's
    # CSP must refuse to load (only data: images are allowed: the page fetches nothing)
    strip = next((demo_run / "morph").glob("*.png"))
    controls = (
        '<img alt="control: corrupt" src="data:image/png;base64,iVBORw0KGgo=">'
        f'<img alt="control: file" src="{strip.as_uri()}">'
    )
    checked.write_text(html.replace("</body>", controls + _CHECK + "</body>", 1), encoding="utf-8")
    try:
        results = {}
        for width in (1400, 700):  # a wide window, and half a laptop screen
            dom = _chromium(
                binary,
                tmp_path / f"profile{width}",
                f"--window-size={width},1000",
                "--virtual-time-budget=10000",
                "--dump-dom",
                checked.as_uri(),
            )
            match = re.search(r'<pre id="peering-check">(.*?)</pre>', dom.stdout, re.S)
            assert match, f"chromium did not run the check (rc {dom.returncode}): {dom.stderr[-2000:]}"
            results[width] = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    finally:
        checked.unlink()
    for result in results.values():
        assert result["images"] == expected_images + 2 > 2
        assert sorted(result["broken"]) == ["control: corrupt", "control: file"]  # and every real one loaded
        assert result["sections"] == TRAINING_SECTIONS
        # the full width of the window (less the page's 24 px padding), and captions of at least 11 px
        assert result["section"] >= result["window"] - 2 * 24 - 1 and result["width"] <= result["window"]
        assert result["captions"] and min(result["captions"]) >= 11
        # the captions drawn inside every picture (16 px) stay >= 11 px as displayed: a picture wider than
        # the page scrolls in its row instead of being scaled down
        assert result["drawn"] and min(result["drawn"]) * _FONT_SIZE >= 11

    # a screenshot of the report itself, as a person opening it sees it
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    done = _chromium(
        binary, tmp_path / "profile2", "--window-size=1200,2000", f"--screenshot={shot}", report.as_uri()
    )
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        grey = im.convert("L")
        low, high = grey.getextrema()
        assert low < 50 and high > 200  # text and pictures, not a blank page
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50
    assert os.path.getsize(shot) > 20_000


# ------------------------------------------------------------------------------------------ confusion atlas


def test_atlas_section_shows_every_matrix_and_the_last_runs_pairs(demo_run):
    from peering.lightning import read_index

    records = read_index(demo_run / "logs")
    matrices = [r for r in records if r["tag"] == "peering/confusion_matrix"]
    assert [r["epoch"] for r in matrices] == [0, 1]  # one per validation run of the 2 epochs
    page = parse(demo_run / "report.html")
    radios = [a for a in page.all("input") if a.get("name") == "atlas-epoch"]
    assert [a["id"] for a in radios] == ["atlas-0", "atlas-1"]
    assert ["checked" in a for a in radios] == [False, True]  # the last epoch is shown first
    alts = [a["alt"] for a in page.all("img")]
    assert [a for a in alts if a.startswith("confusion matrix")] == [
        "confusion matrix, epoch 0",
        "confusion matrix, epoch 1",
    ]
    text = " ".join(page.text)
    last = matrices[-1]
    assert last["pairs"], "a 2-epoch digits model makes mistakes"
    for a, b in last["pairs"]:
        assert f"true {a}, predicted {b}" in text
        counts = [r["matrix"][a][b] for r in matrices]
        assert f"epoch 0: {counts[0]:,}" in text and f"epoch 1: {counts[1]:,}" in text  # its trend
        assert any(alt.startswith(f"true {a} predicted {b}, epoch 1") for alt in alts)  # examples + direction


_STEPPER = """
<script>
window.addEventListener("load", function () {
  var radios = Array.prototype.slice.call(document.querySelectorAll("input[name=atlas-epoch]"));
  var seen = radios.map(function (radio) {
    document.querySelector("label[for=" + radio.id + "]").click();
    var shown = Array.prototype.filter.call(document.querySelectorAll(".stepper .frame"), function (f) {
      return f.getBoundingClientRect().height > 0;
    });
    return shown.map(function (f) { return f.className; });
  });
  var out = document.createElement("pre");
  out.id = "peering-check";
  out.textContent = JSON.stringify(seen);
  document.body.appendChild(out);
});
</script>
"""


def test_atlas_stepper_shows_one_epoch_at_a_time_in_chromium(demo_run, tmp_path):
    """Clicking each epoch's label shows that epoch's matrix and only it (CSS, no script in the page)."""
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not found: install Debian's chromium package (`apt-get install chromium`)")
    html = (demo_run / "report.html").read_text(encoding="utf-8")
    assert "<script" not in html
    html = allow_inline_script(html)
    checked = demo_run / "report.stepper.html"
    checked.write_text(html.replace("</body>", _STEPPER + "</body>", 1), encoding="utf-8")
    try:
        dom = _chromium(
            binary, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()
        )
    finally:
        checked.unlink()
    match = re.search(r'<pre id="peering-check">(.*?)</pre>', dom.stdout, re.S)
    assert match, f"chromium did not run the check (rc {dom.returncode}): {dom.stderr[-2000:]}"
    assert json.loads(match.group(1).replace("&quot;", '"')) == [["frame atlas-0"], ["frame atlas-1"]]
