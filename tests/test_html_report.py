"""``bstab report`` / ``reporting.html_report``: one self-contained HTML file per run.

The page is parsed (stdlib ``html.parser``): every image is an inline PNG that decodes, every
analysed layer is in the summary table, the plan's beta is shown, nothing is fetched from
anywhere. Bad input is reported in the page (one snapshot, NaN layers, a run still being
written) or refused in one line (an existing output, a missing or damaged run). A real headless
browser draws the page; that test skips only where no browser is installed.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import bstab, one_error_line
from helpers.runs import SMALL_LAYERS, small_run, small_snapshots

import basis_stability as bs
from basis_stability.analysis import EngineConfig
from basis_stability.reporting import (
    BrowserNotFoundError,
    find_browser,
    html_report,
    screenshot,
)
from basis_stability.store import RunWriter
from basis_stability.views import LayerView

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NO_CACHE = EngineConfig(cache=False)


class Page(HTMLParser):
    """Every start tag with its attributes, the text, and the body rows of each section's
    tables (a row's ``th`` and ``td`` cells: a key-value row is ``[label, value]``)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.rows: dict[str, list[list[str]]] = {}  # section id -> body rows (cell texts)
        self.chunks: list[str] = []
        self._section, self._row, self._cell, self._in_body = "", None, None, False
        self.feed(text)
        self.close()

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.chunks).split())

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attrs))
        if tag == "section":
            self._section = attrs.get("id", "")
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.setdefault(self._section, []).append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        self.chunks.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def srcs(self, name: str) -> list[str]:
        return [a[name] for _, a in self.tags if name in a]


def _report(run: Path, out: Path, *extra: str) -> Page:
    result = bstab("report", run, "-o", out, "--no-progress", *extra)
    assert result.exit_code == 0, result.output
    assert out.is_file() and str(out) in " ".join(result.output.split())
    return Page(out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def mlp_page(mlp_run_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """The report of the mlp run (a copy: the analysis caches its SVDs beside the run)."""
    folder = tmp_path_factory.mktemp("report")
    run = Path(shutil.copy(mlp_run_file, folder / "mlp.h5"))
    out = folder / "mlp-report.html"
    return run, out, _report(run, out)


# ---------------------------------------------------------------------- the page
def test_every_image_is_an_inline_png_that_decodes(mlp_page):
    from PIL import Image

    _, _, page = mlp_page
    images = [a for t, a in page.tags if t == "img"]
    assert len(images) >= 4  # heatmap, mean stability, spectra, ranks, beta curve ...
    for img in images:
        head, _, data = img["src"].partition(",")
        assert head == "data:image/png;base64", head[:40]
        raw = base64.b64decode(data, validate=True)
        assert raw.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(raw)) as picture:
            picture.load()  # decodes every pixel, not only the header
            assert picture.width > 100 and picture.height > 100
        assert img.get("alt")


def test_every_analysed_layer_is_in_the_summary_table(mlp_page):
    run, _, page = mlp_page
    with bs.open_run(run) as opened:
        names = opened.layer_names
    assert names
    assert [row[0] for row in page.rows["summary"]] == names


def test_the_plan_its_beta_and_its_evidence_appear(mlp_page):
    run, _, page = mlp_page
    plan = bs.analyze(run).plan
    rows = page.rows["plan"]
    cells = {row[0]: row[1] for row in rows if len(row) == 2}
    assert cells["beta"] == f"{plan.beta:g}"
    assert cells["expected trainable share"].startswith(f"{plan.expected_trainable_share:.1%}")
    assert plan.rules["beta"]["why"] in cells["beta rule"]
    if plan.delay_snapshot is None:
        assert plan.rules["delay"]["why"] in cells["delay"]
    else:
        assert f"snapshot {plan.delay_snapshot}" in cells["delay"]
    ranks = {row[0]: row[2] for row in rows if len(row) == 5}  # the ranks table
    assert ranks == {name: f"{k}/{plan.layers[name][1]}" for name, k in plan.ranks.items()}


def test_the_page_has_the_run_metadata_and_a_table_of_contents(mlp_page):
    run, _, page = mlp_page
    with bs.open_run(run) as opened:
        model, count, attrs = opened.model_class, opened.n_snapshots, opened.attrs
    meta = dict(page.rows["run"])
    assert meta["model class"] == model and meta["snapshots"] == f"{count} committed"
    assert attrs["torch_version"] in meta["recorded with"]
    assert meta["storage dtype"] == attrs["storage_dtype"] and meta["created"] == attrs["created"]
    sections = [a["id"] for t, a in page.tags if t == "section"]
    links = [a["href"] for t, a in page.tags if t == "a"]
    assert {"run", "plan", "summary", "network", "figures", "notes"} <= set(sections)
    assert [f"#{s}" for s in sections] == links


def test_nothing_is_fetched_from_anywhere(mlp_page):
    _, out, page = mlp_page
    text = out.read_text(encoding="utf-8")
    for value in page.srcs("src") + page.srcs("href"):
        assert value.startswith(("data:", "#")), value[:80]
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object")]
    assert "http://" not in text and "https://" not in text
    assert "@import" not in text and "url(" not in text


# ---------------------------------------------------------------------- outputs
def test_an_existing_output_is_refused_without_force_and_left_unchanged(mlp_page):
    run, out, _ = mlp_page
    before = out.read_bytes()
    result = bstab("report", run, "-o", out, "--no-progress")
    line = one_error_line(result)
    assert "already exists" in line and "--force" in line and "--output" in line
    assert out.read_bytes() == before
    # --force replaces it (the date in the footer changes, the page does not)
    assert _report(run, out, "--force").rows["summary"] == Page(before.decode()).rows["summary"]


def test_without_output_it_goes_beside_the_run(mlp_run: Path):
    result = bstab("report", mlp_run, "--no-progress", "--no-cache")
    assert result.exit_code == 0, result.output
    assert mlp_run.with_name("mlp-report.html").is_file()


def test_a_report_object_and_the_public_verb(mlp_run: Path, tmp_path: Path):
    report = bs.analyze(mlp_run, engine=NO_CACHE)
    assert bs.html_report is html_report
    written = bs.html_report(report, tmp_path / "r.html")
    assert written == tmp_path / "r.html"
    assert [r[0] for r in Page(written.read_text()).rows["summary"]] == list(report.summary.layer)
    with pytest.raises(bs.BstabError, match="already exists"):
        html_report(report, written)
    with pytest.raises(bs.BstabError, match="Expected `run` to be a run file when"):
        html_report(report, tmp_path / "other.html", engine=NO_CACHE)  # not silently ignored
    assert not (tmp_path / "other.html").exists()


# ---------------------------------------------------------------------- bad input
def test_the_analysis_options_are_those_of_analyze(mlp_run: Path, tmp_path: Path):
    from basis_stability.analysis import AnalysisConfig
    from basis_stability.recommend import PlanConfig

    flags = ("--lag", "2", "--tau", "0.5", "--beta-rule", "share", "--target-share", "0.5")
    page = _report(mlp_run, tmp_path / "r.html", *flags, "--no-cache")
    plan = bs.analyze(
        mlp_run,
        AnalysisConfig(lag=2),
        NO_CACHE,
        PlanConfig(tau=0.5, beta_rule="share", target_share=0.5),
    ).plan
    default = bs.analyze(mlp_run, engine=NO_CACHE).plan
    assert (plan.beta, plan.delay_snapshot) != (default.beta, default.delay_snapshot)
    cells = {row[0]: row[1] for row in page.rows["plan"] if len(row) == 2}
    assert cells["beta"] == f"{plan.beta:g}"
    assert plan.rules["beta"]["why"] in cells["beta rule"]
    assert plan.rules["delay"]["tau"] == 0.5 and plan.rules["delay"]["lag"] == 2
    if plan.delay_snapshot is not None:
        assert f"snapshot {plan.delay_snapshot}" in cells["delay"]
    line = one_error_line(bstab("report", mlp_run, "--tau", "2", "-o", tmp_path / "x.html"))
    assert "--tau" in line and "2" in line and not (tmp_path / "x.html").exists()
    line = one_error_line(bstab("report", mlp_run, "--device", "tpu", "-o", tmp_path / "x.html"))
    assert "`--device`" in line and "`--device cpu`" in line and "device=" not in line
    assert not (tmp_path / "x.html").exists()


def test_a_one_snapshot_run_says_there_are_no_pairs(tmp_path: Path):
    run = tmp_path / "one.h5"
    small_run(run, count=1)
    page = _report(run, tmp_path / "one.html", "--no-cache")
    assert "Only 1 snapshot: there are no snapshot pairs" in page.text
    assert "No stability pairs" in page.text
    assert len(page.rows["summary"]) == 2


def test_steps_known_at_only_some_snapshots_say_so(tmp_path: Path):
    """A loop that passes epochs but no steps: the recorder knows step 0 (the initial weights)
    and nothing after; '0 → 0' alone would read as every snapshot at step 0."""
    run = tmp_path / "nosteps.h5"
    with RunWriter.create(run, SMALL_LAYERS, model_class="Toy") as writer:
        for t, mats in enumerate(small_snapshots(4)):
            writer.append(iter(mats), step=0 if t == 0 else -1, epoch=float(t))
    meta = dict(_report(run, tmp_path / "r.html", "--no-cache").rows["run"])
    assert meta["steps"] == "0 → 0 (recorded at 1 of 4 snapshots)"
    assert meta["epochs"] == "0 → 3"


def test_long_dotted_layer_names_may_wrap_only_between_components(tmp_path: Path):
    name = "bert.encoder.layer.0.attention.self.query"
    layers = [LayerView.of(name, "q.weight", "linear", (12, 6)), SMALL_LAYERS[1]]
    run = tmp_path / "dotted.h5"
    with RunWriter.create(run, layers, model_class="Bert") as writer:
        for t, mats in enumerate(small_snapshots(4)):
            writer.append(iter(mats), step=t, epoch=float(t))
    out = tmp_path / "dotted.html"
    page = _report(run, out, "--no-cache")
    assert [row[0] for row in page.rows["summary"]] == [name, "head"]  # no character lost
    raw = out.read_text(encoding="utf-8")
    assert "<td>bert.<wbr>encoder.<wbr>layer.<wbr>0.<wbr>attention.<wbr>self.<wbr>query</td>" in raw


def _nan_layer_run(path: Path) -> Path:
    """Two layers over six snapshots: ``good`` settles, ``singular`` has a zero column (an
    exact zero singular value: its basis is not unique, so S is NaN throughout)."""
    rng = np.random.default_rng(0)
    good = rng.standard_normal((48, 12))
    singular = rng.standard_normal((32, 16))
    singular[:, -1] = 0.0
    layers = [
        LayerView.of("good", "good.weight", "linear", (48, 12)),
        LayerView.of("singular", "singular.weight", "linear", (32, 16)),
    ]
    with RunWriter.create(path, layers, model_class="MLP") as writer:
        for t in range(6):
            good = good + 1e-3 * 10.0**-t * rng.standard_normal(good.shape)
            mats = [good.astype(np.float32), singular.astype(np.float32)]
            writer.append(iter(mats), step=10 * t, epoch=float(t))
    return path


def test_a_nan_layer_is_named_with_why(tmp_path: Path):
    run = _nan_layer_run(tmp_path / "nan.h5")
    page = _report(run, tmp_path / "nan.html", "--no-cache")
    rows = {row[0]: row for row in page.rows["summary"]}
    assert set(rows) == {"good", "singular"}
    assert "rank-deficient" in rows["singular"][-1] and rows["good"][-1] == ""
    assert "undefined S (NaN) somewhere: singular" in page.text
    assert ("tr", {"class": "nan"}) in page.tags
    # at every lag pair (one with the default lag of 5 snapshots)
    assert re.search(r"singular: S undefined at (\d+) of \1 lag pairs: rank-deficient", page.text)


def test_a_run_being_written_is_reported_as_live(tmp_path: Path):
    sys.path.insert(0, str(Path(__file__).with_name("helpers")))
    from crash_trial import Writer

    run = tmp_path / "live.h5"
    writer = Writer(run, "--sizes", "24,16,8", "--count", "2", "--interval", "0.05", "--hold")
    try:
        writer.wait_for("holding")
        page = _report(run, tmp_path / "live.html", "--no-cache")
        writer.release()
        assert writer.finish() == 0, writer.output()
    finally:
        writer.stop()
    assert "This run is live or incomplete (still being recorded by process" in page.text
    assert "covers the 3 snapshots committed when it was read" in page.text


def test_a_missing_or_damaged_run_is_one_clean_line(tmp_path: Path, mlp_run: Path):
    line = one_error_line(bstab("report", tmp_path / "nope.h5", "--no-progress"))
    assert "No run file" in line
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(mlp_run.read_bytes()[:50_000])
    line = one_error_line(bstab("report", damaged, "--no-progress"))
    assert "truncated" in line or "damaged" in line
    assert not list(tmp_path.glob("*report.html"))


# ---------------------------------------------------------------------- a real browser
def test_a_headless_browser_draws_the_page(mlp_page, tmp_path: Path):
    from PIL import Image

    if find_browser() is None:
        pytest.skip("no Chromium or Chrome browser installed (apt-get install chromium)")
    _, out, _ = mlp_page
    png = screenshot(out, tmp_path / "shot.png", size=(1000, 1400))
    with Image.open(png) as picture:
        assert picture.size == (1000, 1400)
        pixels = np.asarray(picture.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50, "the screenshot is (nearly) a single colour"
    assert (pixels < 100).all(axis=2).mean() > 0.005  # some dark text on the page


def test_no_browser_is_a_clear_error(mlp_page, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BSTAB_BROWSER", str(tmp_path / "no-such-browser"))
    assert find_browser() is None
    with pytest.raises(BrowserNotFoundError, match="apt-get install chromium"):
        screenshot(mlp_page[1], tmp_path / "shot.png")
    assert not (tmp_path / "shot.png").exists()
