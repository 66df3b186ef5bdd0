"""One static page about a training run: ``<run_dir>/report/index.html`` + PNGs (``ssl-path-report``).

The page opens from disk (no server, no JavaScript); every picture is a PNG in the report folder,
drawn with matplotlib, so the folder can be copied or attached as it is. Sections, in order
(:data:`SECTIONS`); one with nothing to show says so, one that fails says why, and the rest are drawn:

* **Config diff from the defaults**: every key of the run's composed config
  (``<run_dir>/.hydra/config.yaml``, interpolations unresolved) whose value differs from the default
  composition of ``configs/train.yaml``, or that only one of them has; and the command-line overrides
  (``.hydra/overrides.yaml``).
* **Loss terms** ``loss/*``, **Schedules** (``train/lr``, ``last_layer_lr``, ``weight_decay``,
  ``momentum``, ``teacher_temp``, then the other ``train/*`` columns), **Health monitors**
  (``health/*``, entropies with ``ln K`` dashed, and the warnings of ``train.log``),
  **Throughput and data wait** (``perf/*``): from the CSV logs (:mod:`ssl_path.viz.metrics`), every
  column of the prefix, so monitors added later appear on their own.
* **Periodic eval**: ``<run_dir>/eval/knn_curve.csv`` of the periodic-eval callback (mean over folds
  with the pooled bootstrap band), else the ``eval/*`` columns of the logs.
* **PCA maps by checkpoint**: one fixed region (the first slide of the run's data whose file is
  here, at the data's µm/px, centred on tissue; or ``region.slide``) drawn with the teacher of each
  saved checkpoint (``step-N.ckpt`` and ``last.ckpt``, at most ``max_checkpoints``, evenly spread),
  side by side, and the last one's CLS attention per head (:mod:`ssl_path.viz.draw`).
* **Tiling QC**: the tiler's QC thumbnails of the run's ``data.root`` (``qc/<slide_id>.png``, listed
  per slide in ``manifest.json`` as ``qc``; copied into the report) and a link to its
  ``qc/index.html``; the manifest's slide table either way.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from ssl_path import CONFIG_DIR, __version__
from ssl_path.contracts import (
    CHECKPOINT_DIR,
    HYDRA_CONFIG,
    LAST_CHECKPOINT,
    SNAPSHOT_GLOB,
    STATUS_FILE,
    is_remote,
    read_manifest,
    snapshot_step,
)
from ssl_path.viz.draw import VizConfig, attention_figure, load_model, pca_image, region_maps, save_png
from ssl_path.viz.metrics import Series, plot_panels, read_metrics, select
from ssl_path.viz.regions import IMAGE_EXTENSIONS, Region, slide_region, tile_region

log = logging.getLogger(__name__)

__all__ = ["SECTIONS", "RegionSpec", "ReportConfig", "build_report", "config_diff", "flatten"]

REPORT_DIR = "report"
INDEX = "index.html"
SECTIONS = {
    "config": "Config diff from the defaults",
    "losses": "Loss terms",
    "schedules": "Schedules",
    "health": "Health monitors",
    "throughput": "Throughput and data wait",
    "eval": "Periodic eval",
    "pca": "PCA maps by checkpoint",
    "qc": "Tiling QC",
}
SCHEDULES = ("train/lr", "train/last_layer_lr", "train/weight_decay", "train/momentum", "train/teacher_temp")
LOG_K = "health/log_k"
_MISSING = "<absent>"
NO_METRICS = "No metrics.csv under the run directory (ssl-path-train writes one unless logger= drops csv)."


@dataclass(frozen=True)
class RegionSpec:
    """The fixed region of the PCA section: ``slide`` (a slide or an image file; ``None`` = the first
    slide of the run's data that exists here), its top-left ``x``, ``y`` (level 0; ``None`` = centred
    on tissue), ``size`` px at ``mpp`` µm/px (``None`` = the data's, for the data's own slide) or at
    ``level``."""

    slide: str | None = None
    x: int | None = None
    y: int | None = None
    size: int = 448
    level: int = 0
    mpp: float | None = None


@dataclass(frozen=True)
class ReportConfig:
    """``configs/report.yaml``: where the page goes, what the config is diffed against, the region."""

    output: str | None = None
    defaults_config: str = "train"
    max_checkpoints: int = 6
    region: RegionSpec = field(default_factory=RegionSpec)
    viz: VizConfig = field(default_factory=VizConfig)


# ---------------------------------------------------------------------------------------------- config


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}``; lists and scalars are leaves, an empty dict is a leaf."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): obj}


def config_diff(run: Mapping, default: Mapping) -> list[tuple[str, Any, Any]]:
    """``(key, default value, run value)`` for every flattened key that differs (``<absent>`` when one
    side lacks it), sorted by key; the ``hydra`` node is left out."""
    a = {k: v for k, v in flatten(default).items() if not k.startswith("hydra.")}
    b = {k: v for k, v in flatten(run).items() if not k.startswith("hydra.")}
    return [
        (k, a.get(k, _MISSING), b.get(k, _MISSING))
        for k in sorted(set(a) | set(b))
        if a.get(k, _MISSING) != b.get(k, _MISSING)
    ]


def compose_defaults(name: str = "train") -> DictConfig:
    """``configs/<name>.yaml`` composed with no override (inside a hydra app: with its config search path)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(name)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name)


def _value(v: Any) -> str:
    if v == _MISSING:
        return v
    return json.dumps(v, default=str) if not isinstance(v, str) else v


# -------------------------------------------------------------------------------------------- the run


def run_data_root(run_dir: Path) -> str | None:
    """The run's ``data.root``, resolved from its saved hydra config (relative to the directory it was
    started from, ``hydra.runtime.cwd``); ``None`` if it cannot be resolved."""
    cfg_path = run_dir / HYDRA_CONFIG
    if not cfg_path.is_file():
        return None
    cfg = OmegaConf.load(cfg_path)
    try:
        root = OmegaConf.select(cfg, "data.root", throw_on_resolution_failure=True)
    except Exception as err:  # noqa: BLE001 - an interpolation this process cannot resolve
        log.warning("cannot resolve data.root of %s: %s", cfg_path, err)
        return None
    if root is None:
        return None
    root = str(root)
    if is_remote(root) or Path(root).is_absolute():
        return root
    hydra_yaml = cfg_path.with_name("hydra.yaml")
    cwd = None
    if hydra_yaml.is_file():
        cwd = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.cwd", default=None)
    return str((Path(cwd) if cwd else Path.cwd()) / root)


def checkpoints(run_dir: Path, limit: int) -> list[Path]:
    """The run's ``step-N.ckpt`` by step, then ``last.ckpt`` unless it is (a hard link to) the newest
    snapshot; at most ``limit``, evenly spread, the first and the last kept."""
    folder = run_dir / CHECKPOINT_DIR
    snaps = sorted(folder.glob(SNAPSHOT_GLOB), key=lambda p: snapshot_step(p.name) or -1)
    snaps = [p for p in snaps if snapshot_step(p.name) is not None]
    last = folder / LAST_CHECKPOINT
    paths = list(snaps)
    if last.is_file() and not (snaps and os.path.samefile(last, snaps[-1])):
        paths.append(last)
    if limit > 0 and len(paths) > limit:
        idx = np.unique(np.round(np.linspace(0, len(paths) - 1, limit)).astype(int))
        paths = [paths[i] for i in idx]
    return paths


def _shard_tile(root: str, manifest: Mapping) -> Region | None:
    """The first image of the first shard of a local dataset (when none of its slides is here)."""
    from PIL import Image

    for shard in manifest.get("shards", []):
        path = Path(root) / shard["path"]
        if not path.is_file():
            continue
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in (".jpg", ".jpeg", ".png"):
                    data = tar.extractfile(member)
                    img = np.asarray(Image.open(data).convert("RGB"))
                    name = Path(member.name).name.split(".")[0]
                    return Region(name=name, image=img, source={"shard": str(path), "member": member.name})
    return None


def fixed_region(spec: RegionSpec, root: str | None, manifest: Mapping | None) -> tuple[Region | None, str]:
    """The PCA section's region and a sentence saying where it came from."""
    if spec.slide is not None:
        path = Path(spec.slide)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return tile_region(path), f"tile {path}"
        region = slide_region(path, spec.size, spec.x, spec.y, spec.level, spec.mpp)
        return region, f"slide {path}"
    if root is None or manifest is None:
        return None, "the run's data manifest could not be read, and no region.slide was given"
    mpps = manifest.get("config", {}).get("target_mpps") or [None]
    mpp = spec.mpp if spec.mpp is not None else mpps[0]
    for slide_id, rec in sorted(manifest.get("slides", {}).items()):
        source = rec.get("source")
        if rec.get("status") != "ok" or not source or not Path(source).is_file():
            continue
        region = slide_region(source, spec.size, spec.x, spec.y, spec.level, mpp, rec.get("mpp"))
        at = f"{mpp:g} µm/px (the data's)" if mpp is not None else f"level {spec.level}"
        return region, f"slide {slide_id} of the run's data ({source}), {spec.size} px at {at}"
    if not is_remote(root):
        region = _shard_tile(root, manifest)
        if region is not None:
            return region, f"no slide of the run's data is here; the first tile of its shards ({region.name})"
    return None, "no slide of the run's data is here and no tile could be read; set region.slide"


# ---------------------------------------------------------------------------------------------- html


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _empty(text: str) -> str:
    return f'<p class="empty">{_esc(text)}</p>'


def _img(rel: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="{_esc(rel)}" alt="{_esc(alt)}"{w}>'


def _figure(rel: str, label: str, detail: str, width: int) -> str:
    caption = f"<b>{_esc(label)}</b><br>{_esc(detail)}"
    img = _img(rel, label, width)
    return f'<figure style="width:{width}px">{img}<figcaption>{caption}</figcaption></figure>'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    c = f' class="{cls}"' if cls else ""
    return f"<table{c}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _summary(series: Series) -> str:
    rows = []
    for name, (steps, values) in series.items():
        rows.append(
            [name, _fmt(values[-1]), int(steps[-1]), _fmt(values.min()), _fmt(values.max()), len(values)]
        )
    return _table(["metric", "last", "at step", "min", "max", "points"], rows, "num")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1280px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
nav a { margin-right: 1em; } .meta { color: #555; } .empty { color: #777; font-style: italic; }
table { border-collapse: collapse; font-size: .85em; margin: .6em 0; }
td, th { border: 1px solid #ddd; padding: .2em .5em; text-align: left; vertical-align: top; }
table.num td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
code, td { font-family: ui-monospace, monospace; } img { max-width: 100%; }
.row { display: flex; flex-wrap: wrap; gap: .8em; } figure { margin: 0; }
figcaption { font-size: .8em; color: #444; text-align: center; }
.error { color: #a00; } pre { background: #f6f6f6; padding: .5em; overflow-x: auto; font-size: .8em; }
"""


class _Page:
    """Collects the sections of the page; files go under ``out``, referenced relative to it."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.parts: dict[str, str] = {}

    def path(self, rel: str) -> Path:
        p = self.out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def section(self, key: str, build: Callable[[], str]) -> None:
        try:
            body = build()
        except Exception as err:  # noqa: BLE001 - one broken section must not cost the others
            log.warning("report section %r failed: %s: %s", SECTIONS[key], type(err).__name__, err)
            body = (
                f'<p class="error">Could not draw this section: {_esc(type(err).__name__)}: {_esc(err)}</p>'
            )
        self.parts[key] = body


# -------------------------------------------------------------------------------------------- sections


def _config_section(run_dir: Path, defaults_config: str) -> str:
    cfg_path = run_dir / HYDRA_CONFIG
    overrides_path = cfg_path.with_name("overrides.yaml")
    parts = []
    if overrides_path.is_file():
        overrides = yaml.safe_load(overrides_path.read_text()) or []
        text = " ".join(str(o) for o in overrides) if overrides else "(none)"
        parts.append(f"<p>Command-line overrides: <code>{_esc(text)}</code></p>")
    if not cfg_path.is_file():
        return "".join(parts) + _empty(f"No saved hydra config ({HYDRA_CONFIG}) in the run directory.")
    run = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False)
    default = OmegaConf.to_container(compose_defaults(defaults_config), resolve=False)
    diff = config_diff(run, default)
    changed = [(k, _value(a), _value(b)) for k, a, b in diff if _MISSING not in (a, b)]
    added = [(k, _value(b)) for k, a, b in diff if a == _MISSING]
    removed = [(k, _value(a)) for k, a, b in diff if b == _MISSING]
    parts.append(
        f"<p>The run's <code>{_esc(HYDRA_CONFIG)}</code> against "
        f"<code>configs/{_esc(defaults_config)}.yaml</code> "
        f"composed with no override (values before interpolation): {len(changed)} changed, "
        f"{len(added)} only in this run, {len(removed)} only in the defaults.</p>"
    )
    parts.append(_table(["key", "default", "this run"], changed) if changed else _empty("No value changed."))
    for rows, what in ((added, "only in this run"), (removed, "only in the defaults")):
        if rows:
            parts.append(
                f"<details><summary>{len(rows)} keys {what} (a config group chosen or dropped)</summary>"
                f"{_table(['key', 'value'], rows)}</details>"
            )
    return "".join(parts)


def _plot_section(
    page: _Page,
    series: Series,
    name: str,
    what: str,
    decorate=None,
    intro: str = "",
) -> str:
    if not series:
        return _empty(f"No {what} metrics were logged in this run.")
    rel = f"plots/{name}.png"
    plot_panels(series, page.path(rel), decorate=decorate)
    return intro + _img(rel, what) + _summary(series)


def _log_k_line(metrics: Series, match: Callable[[str], bool]):
    if LOG_K not in metrics:
        return None
    ln_k = float(metrics[LOG_K][1][-1])

    def decorate(ax, name: str) -> None:
        if match(name):
            ax.axhline(ln_k, ls="--", lw=1, color="grey", label=f"ln K = {ln_k:.3g}")
            ax.legend(fontsize=7)

    return decorate


def _log_warnings(run_dir: Path, limit: int = 20) -> str:
    path = run_dir / "train.log"
    if not path.is_file():
        return ""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if "WARNING" in ln]
    if not lines:
        return "<p>No warnings in <code>train.log</code>.</p>"
    shown = lines[-limit:]
    head = f"<p>{len(lines)} warning line(s) in <code>train.log</code>"
    head += f" (the last {limit}):</p>" if len(lines) > limit else ":</p>"
    return head + f"<pre>{_esc(chr(10).join(shown))}</pre>"


def _eval_section(page: _Page, run_dir: Path, metrics: Series) -> str:
    from ssl_path.eval.callback import CURVE_CSV
    from ssl_path.eval.report import plot_curve, read_csv

    curve = run_dir / "eval" / CURVE_CSV
    if curve.is_file():
        rows = read_csv(curve)
        if rows:
            rel = "plots/eval_curve.png"
            plot_curve(rows, page.path(rel))
            cols = [
                c
                for c in ("step", "dataset", "probe", "accuracy", "balanced_accuracy", "macro_f1")
                if c in rows[0]
            ]
            table_rows = [
                [r[c] if c in ("step", "dataset", "probe") else _fmt(float(r[c])) for c in cols] for r in rows
            ]
            intro = (
                f"<p>From <code>eval/{CURVE_CSV}</code> of the periodic-eval callback: mean over folds, "
                "the band is the pooled 95 % bootstrap interval.</p>"
            )
            return intro + _img(rel, "periodic eval curve") + _table(cols, table_rows, "num")
    logged = select(metrics, "eval/", exclude=("eval/seconds",))
    if logged:
        return _plot_section(page, logged, "eval", "eval/*")
    return _empty("No periodic evaluation in this run (add callbacks=eval to ssl-path-train).")


def _pca_section(page: _Page, run_dir: Path, cfg: ReportConfig, root: str | None, manifest) -> str:
    ckpts = checkpoints(run_dir, cfg.max_checkpoints)
    if not ckpts:
        return _empty(f"No checkpoints in {run_dir / CHECKPOINT_DIR}.")
    region, where = fixed_region(cfg.region, root, manifest)
    if region is None:
        return _empty(f"No region to draw: {where}.")
    figures, last_maps, last_model = [], None, None
    for path in ckpts:
        model = load_model(path)
        maps = region_maps(model.backbone, region.image, cfg.viz, model.normalisation)
        label = f"step {model.step}" if model.step is not None else path.stem
        rel = f"pca/{path.stem}_pca.png"
        save_png(pca_image(maps), page.path(rel))
        figures.append((rel, label, f"{path.name}, {maps.pca.foreground.mean():.0%} foreground"))
        last_maps, last_model = maps, model
    save_png(last_maps.image, page.path("pca/region.png"))
    # one row on a 1280 px wide page: the region and up to 6 checkpoints
    width = max(128, min(256, last_maps.image.shape[1], 1200 // (len(figures) + 1) - 14))
    cells = [_figure("pca/region.png", "region", "the pixels the backbone sees", width)]
    cells += [_figure(rel, label, detail, width) for rel, label, detail in figures]
    h, w = last_maps.features.grid
    title = f"{last_model.name} step {last_model.step}: last-block CLS attention"
    att_rel = "pca/attention_last.png"
    attention_figure(last_maps, page.path(att_rel), title, cfg.viz.cmap)
    intro = (
        f"<p>Region: {_esc(where)}; the backbone sees {last_maps.image.shape[1]} px, a {h} x {w} patch grid. "
        f"First three PCA components of the teacher's patch tokens as RGB (background mask: "
        f"{_esc(cfg.viz.mask)}, black), one PCA per checkpoint, so colours are not comparable across "
        "checkpoints, only the parts of the region they separate.</p>"
    )
    att = f"<h3>CLS attention of the last checkpoint</h3>{_img(att_rel, 'CLS attention per head')}"
    return intro + f'<div class="row">{"".join(cells)}</div>' + att


def _qc_entry(rec: Mapping) -> str | None:
    qc = rec.get("qc")
    if isinstance(qc, Mapping):
        qc = qc.get("path") or qc.get("png") or qc.get("thumbnail")
    return str(qc) if qc else None


def _qc_section(page: _Page, root: str | None, manifest: Mapping | None) -> str:
    if root is None:
        return _empty("The run's data.root could not be resolved from its saved config: no QC images.")
    if is_remote(root):
        link = f"{root.rstrip('/')}/qc/index.html"
        anchor = f'<a href="{_esc(link)}">{_esc(link)}</a>'
        return f"<p>The data is remote: no QC images copied; the index is at {anchor}.</p>"
    if manifest is None:
        return _empty(f"No manifest.json in {root}: no QC images.")
    root_path = Path(root)
    parts = [f"<p>Data: <code>{_esc(root)}</code>.</p>"]
    index = root_path / "qc" / "index.html"
    slides = manifest.get("slides", {})
    figures = []
    for slide_id, rec in sorted(slides.items()):
        entry = _qc_entry(rec)
        src = (root_path / entry) if entry else root_path / "qc" / f"{slide_id}.png"
        if not src.is_file():
            continue
        rel = f"qc/{slide_id}.png"
        shutil.copyfile(src, page.path(rel))
        caption = f"{slide_id}: {rec.get('status')}, {rec.get('tiles', 0)} tiles"
        figures.append(f"<figure>{_img(rel, caption, 300)}<figcaption>{_esc(caption)}</figcaption></figure>")
    if index.is_file():
        parts.append(f'<p>Tiler QC index: <a href="{_esc(index.resolve().as_uri())}">{_esc(index)}</a>.</p>')
    if figures:
        parts.append(f'<div class="row">{"".join(figures)}</div>')
    elif not index.is_file():
        parts.append(_empty("No QC images in the run's data (tiled before ssl-path-tile wrote qc/)."))
    rows = [
        (k, r.get("status"), r.get("tiles", ""), r.get("mpp") or "", r.get("reason") or "")
        for k, r in sorted(slides.items())
    ]
    parts.append(_table(["slide", "status", "tiles", "level-0 µm/px", "reason"], rows))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- page


def _header(run_dir: Path, metrics: Series) -> str:
    status_path = run_dir / STATUS_FILE
    status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    last_step = max((int(s[-1]) for s, _ in metrics.values()), default=None)
    facts = [
        f"run dir <code>{_esc(run_dir)}</code>",
        f"status {_esc(status.get('status', 'unknown'))}",
        f"last logged step {_esc(last_step if last_step is not None else 'none')}",
        f"report written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by ssl_path {__version__}",
    ]
    return f'<p class="meta">{" · ".join(facts)}</p>'


def build_report(run_dir: str | Path, cfg: ReportConfig | None = None) -> Path:
    """Write the report of ``run_dir`` (see the module docstring); returns the ``index.html`` path."""
    cfg = cfg or ReportConfig()
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir {run_dir} is not a directory")
    out = Path(cfg.output) if cfg.output else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("plots", "pca", "qc"):  # no stale pictures of an earlier report
        shutil.rmtree(out / sub, ignore_errors=True)
    page = _Page(out)
    metrics = read_metrics(run_dir)
    root = run_data_root(run_dir)
    manifest = None
    if root is not None:
        try:
            manifest = read_manifest(root, retries=1)
        except Exception as err:  # noqa: BLE001 - reported in the sections that need it
            log.warning("cannot read the manifest of %s: %s", root, err)

    page.section("config", lambda: _config_section(run_dir, cfg.defaults_config))
    ln_k_loss = _log_k_line(metrics, lambda n: n == "loss/dino")
    page.section(
        "losses", lambda: _plot_section(page, select(metrics, "loss/"), "losses", "loss/*", ln_k_loss)
    )

    def schedules() -> str:
        sched = {k: metrics[k] for k in SCHEDULES if k in metrics}
        other = {k: v for k, v in select(metrics, "train/").items() if k not in sched}
        html_ = _plot_section(page, sched, "schedules", "schedule")
        if other:
            html_ += "<h3>Other train/* metrics</h3>" + _plot_section(page, other, "train_other", "train/*")
        return html_

    page.section("schedules", schedules)

    def health() -> str:
        series = select(metrics, "health/", exclude=(LOG_K,))
        intro = ""
        if LOG_K in metrics:
            ln_k = metrics[LOG_K][1][-1]
            intro = (
                f"<p>K = {np.exp(ln_k):.0f} prototypes, ln K = {ln_k:.4g} (dashed on the entropy panels).</p>"
            )
        decorate = _log_k_line(metrics, lambda n: "entropy" in n)
        return _plot_section(page, series, "health", "health/*", decorate, intro) + _log_warnings(run_dir)

    page.section("health", health)
    page.section("throughput", lambda: _plot_section(page, select(metrics, "perf/"), "throughput", "perf/*"))
    page.section("eval", lambda: _eval_section(page, run_dir, metrics))
    page.section("pca", lambda: _pca_section(page, run_dir, cfg, root, manifest))
    page.section("qc", lambda: _qc_section(page, root, manifest))

    nav = "".join(f'<a href="#{k}">{_esc(v)}</a>' for k, v in SECTIONS.items())
    body = "".join(
        f'<section id="{k}"><h2>{_esc(SECTIONS[k])}</h2>{page.parts[k]}</section>' for k in SECTIONS
    )
    if not metrics:
        body = _empty(NO_METRICS) + body
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Run report: {_esc(run_dir.name)}</title>"
        '<link rel="icon" href="data:,">'
        f"<style>{_CSS}</style></head><body>"
        f"<h1>Run report: {_esc(run_dir.name)}</h1>{_header(run_dir, metrics)}<nav>{nav}</nav>{body}"
        "</body></html>\n"
    )
    index = out / INDEX
    tmp = index.with_name(f".{INDEX}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, index)
    return index
