"""ssl-path-report: the page of a real tiny run has every section, draws what the run logged, and
references only files that exist; a run dir with nothing in it still gives a page that says so."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from ssl_path.viz.report import SECTIONS, build_report, checkpoints, config_diff


class _Refs(HTMLParser):
    """Every ``src``/``href`` and every ``<h2>`` text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.h2: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        self._in_h2 = self._in_h2 and tag != "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data.strip())


def _parse(index: Path) -> _Refs:
    parser = _Refs()
    parser.feed(index.read_text())
    return parser


def _local_files(index: Path, refs: list[str]) -> list[Path]:
    """The files the page points at (relative paths and file:// URLs; anchors and data: skipped)."""
    files = []
    for ref in refs:
        url = urlparse(ref)
        if ref.startswith("#") or url.scheme == "data":
            continue
        assert url.scheme in ("", "file"), f"the page points off the disk: {ref}"
        files.append(Path(unquote(url.path)) if url.scheme == "file" else index.parent / unquote(ref))
    return files


def test_report_of_a_smoke_run(smoke_run, smoke_report):
    page = _parse(smoke_report)
    assert page.h2 == list(SECTIONS.values())
    files = _local_files(smoke_report, page.refs)
    assert files and all(f.is_file() for f in files), [f for f in files if not f.is_file()]
    images = {str(f.relative_to(smoke_report.parent)) for f in files if f.suffix == ".png"}
    for expected in ("losses", "schedules", "health", "throughput", "eval_curve"):
        assert f"plots/{expected}.png" in images
    # the fixed region at each of the two checkpoints (last.ckpt is a hard link to step-4: drawn once)
    assert {"pca/region.png", "pca/step-00000002_pca.png", "pca/step-00000004_pca.png"} <= images
    assert [p.name for p in checkpoints(smoke_run, 6)] == ["step-00000002.ckpt", "step-00000004.ckpt"]
    text = smoke_report.read_text()
    assert "experiment=smoke" in text and "model.head.out_dim" in text  # the override and the diff
    for column in (
        "loss/dino",
        "train/lr",
        "train/teacher_temp",
        "health/teacher_entropy",
        "perf/images_per_s",
    ):
        assert f"<td>{column}</td>" in text
    assert "kather2016-100" in text  # the kNN curve's table
    assert "<b>step 2</b><br>step-00000002.ckpt" in text and "<b>step 4</b><br>step-00000004.ckpt" in text
    assert "CMU-1-Small-Region" in text and "TCGA-CR-7395-01A-01-TS1" in text  # the data's slide table
    assert "<script" not in text  # a static page
    assert 'class="error"' not in text  # no section failed


def test_report_of_an_empty_run_dir_says_what_is_missing(tmp_path):
    (tmp_path / "run").mkdir()
    index = build_report(tmp_path / "run")
    page = _parse(index)
    assert page.h2 == list(SECTIONS.values())
    text = index.read_text()
    assert "No metrics.csv" in text and "No saved hydra config" in text
    assert "No checkpoints" in text and "no QC images" in text
    assert len(re.findall(r'class="empty"', text)) >= len(SECTIONS)
    assert 'class="error"' not in text
    assert _local_files(index, page.refs) == []


def test_config_diff_lists_changed_added_and_removed_keys():
    default = {"a": {"b": 1, "c": [1, 2]}, "gone": 0, "hydra": {"x": 1}}
    run = {"a": {"b": 2, "c": [1, 2]}, "new": {"k": "v"}, "hydra": {"x": 2}}
    assert config_diff(run, default) == [("a.b", 1, 2), ("gone", 0, "<absent>"), ("new.k", "<absent>", "v")]


def test_report_shows_the_tiling_qc_of_the_runs_data(tiled_root, tmp_path):
    """The run's data.root (from its saved config) with QC thumbnails listed in the manifest as ``qc``:
    they are copied into the report, the QC index is linked; without them the page says so."""
    data = tmp_path / "data"
    (data / "qc").mkdir(parents=True)
    manifest = json.loads((tiled_root / "manifest.json").read_text())
    for slide_id, rec in manifest["slides"].items():
        rec["qc"] = f"qc/{slide_id}.png"
        Image.new("RGB", (40, 30), (200, 120, 160)).save(data / rec["qc"])
    (data / "manifest.json").write_text(json.dumps(manifest))
    (data / "qc" / "index.html").write_text("<html><body>QC</body></html>")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(f"data:\n  root: {data}\n")

    index = build_report(run)
    text = index.read_text()
    for slide_id in manifest["slides"]:
        assert (index.parent / "qc" / f"{slide_id}.png").is_file()
        assert f'src="qc/{slide_id}.png"' in text
    assert (data / "qc" / "index.html").as_uri() in text
    assert all(f.is_file() for f in _local_files(index, _parse(index).refs))

    shutil.rmtree(data / "qc")
    text = build_report(run).read_text()
    assert "No QC images" in text and not (index.parent / "qc").exists()
    assert "CMU-1-Small-Region" in text  # the manifest's slide table either way
