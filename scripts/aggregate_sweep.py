#!/usr/bin/env python
"""Summarise a model-size x data-size sweep into a table (CSV + markdown) and a scaling plot (PNG).

Scaling studies in the style of Virchow (Vorontsov et al. 2024, arXiv:2309.07778) and of
"Scaling Laws for Neural Language Models" (Kaplan et al. 2020, arXiv:2001.08361) plot a downstream
metric against the data size (one line per model size) and against training compute.

A run is any directory holding ``.hydra/config.yaml`` (a hydra job dir). For each run we read:
- the swept values from ``.hydra/overrides.yaml`` and the config group choices from ``.hydra/hydra.yaml``;
- the last logged value of every column of Lightning's CSVLogger files ``<run>/**/metrics.csv``, and
  the probe scores of ``ssl-path-eval ... output=<run>/eval`` (``<run>/eval/results.csv``) if present;
- the number of slides, images seen, parameters and FLOPs from logged columns when present, else from
  the config (tier x slides in the manifest, steps x batch size, a ViT FLOP estimate).
The intended grid comes from ``<sweep>/multirun.yaml`` (written by hydra at launch) or ``--expect``;
jobs of the grid without a finished run are listed as missing, so partial sweeps are summarised too.

    python scripts/aggregate_sweep.py multirun/scaling --out docs/ --metric auto
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

# Columns searched (in order) when --metric auto: downstream probes first, then the training loss.
AUTO_METRICS = ("knn", "linear", "probe", "acc", "f1", "loss")
TOTAL_LOSS = ("loss/total", "train/loss", "loss", "train/total_loss", "train/loss/total")
# ViT shapes (embed_dim, depth, mlp_ratio) for the closed-form estimate when ssl_path cannot build the model.
VIT_SHAPES = {
    "vit_tiny": (192, 12, 4.0),
    "vit_s": (384, 12, 4.0),
    "vit_b": (768, 12, 4.0),
    "vit_l": (1024, 24, 4.0),
    "vit_h": (1280, 32, 5.3375),
    "vit_g": (1536, 40, 4.0),
}


@dataclass
class Run:
    """One job of the sweep: what was asked (overrides) and what it produced (last metric values)."""

    run_dir: Path
    overrides: dict[str, str]
    choices: dict[str, str]
    config: dict
    metrics: dict[str, float] = field(default_factory=dict)
    status: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- reading
def find_runs(sweep_dir: Path) -> list[Run]:
    """All hydra job dirs below ``sweep_dir`` (the sweep dir itself counts for a single run)."""
    found: list[Path] = []
    for cfg_file in sorted(sweep_dir.rglob(".hydra/config.yaml"), key=lambda p: len(p.parts)):
        run_dir = cfg_file.parent.parent
        # skip submitit's folder and hydra dirs of tools run inside a run (e.g. <run>/eval/hydra)
        if ".submitit" in run_dir.parts or any(r in run_dir.parents for r in found):
            continue
        found.append(run_dir)
    return [read_run(run_dir) for run_dir in sorted(found)]


def _load_yaml(path: Path) -> object:
    """YAML without interpolation: hydra's saved configs are plain data apart from ``${...}`` strings."""
    if not path.is_file():
        return None
    with path.open() as f:
        return yaml.safe_load(f)


def read_run(run_dir: Path) -> Run:
    overrides = parse_overrides(_load_yaml(run_dir / ".hydra" / "overrides.yaml") or [])
    hydra_cfg = _load_yaml(run_dir / ".hydra" / "hydra.yaml") or {}
    choices = (hydra_cfg.get("hydra", {}).get("runtime", {}) or {}).get("choices", {}) or {}
    config = _load_yaml(run_dir / ".hydra" / "config.yaml") or {}
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    metrics = read_metrics(run_dir) | read_eval_results(run_dir / "eval" / "results.csv")
    return Run(run_dir, overrides, dict(choices), config, metrics, status)


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["model=vit_tiny", "+x=1", "~y"]`` -> ``{"model": "vit_tiny", "x": "1"}`` (deletions dropped)."""
    out = {}
    for item in items:
        if "=" not in item or item.startswith("~"):
            continue
        key, value = item.split("=", 1)
        out[key.lstrip("+")] = value
    return out


def read_metrics(run_dir: Path) -> dict[str, float]:
    """Last finite value of each column over all CSVLogger files of a run, ordered by step.

    A resumed run may write a new ``version_N`` directory; rows of all versions are merged by step, so
    the value of the most advanced step wins.
    """
    rows: list[tuple[float, int, dict[str, str]]] = []
    for order, path in enumerate(sorted(run_dir.rglob("metrics.csv"))):
        with path.open(newline="") as f:
            for i, row in enumerate(csv.DictReader(f)):
                step = _to_float(row.get("step"))
                rows.append((step if step is not None else -1.0, order * 10**9 + i, row))
    last: dict[str, float] = {}
    for _, _, row in sorted(rows, key=lambda r: (r[0], r[1])):
        for key, raw in row.items():
            value = _to_float(raw)
            if key and value is not None:
                last[key] = value
    return last


def read_eval_results(path: Path, model: str = "checkpoint") -> dict[str, float]:
    """Probe scores written by ``ssl-path-eval ... output=<run>/eval`` (``results.csv``), named like the
    periodic eval callback's metrics, ``eval/<dataset>/<probe>_<score>`` (means only, no baselines)."""
    if not path.is_file():
        return {}
    out = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("model") != model:
                continue
            for key, raw in row.items():
                value = _to_float(raw)
                if key.endswith("_mean") and value is not None:
                    out[f"eval/{row['dataset']}/{row['probe']}_{key[: -len('_mean')]}"] = value
    return out


def _to_float(raw: object) -> float | None:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _get(config: dict, dotted: str) -> object:
    """``config["a"]["b"]`` for ``"a.b"``, with ``${...}`` interpolations resolved where possible
    (hydra saves the config unresolved; ``${hydra:...}`` cannot be resolved outside the job)."""
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(OmegaConf.create(config), dotted, default=None)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: treat as unknown
        return None
    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


# ------------------------------------------------------------------------------------------- the grid
def expected_grid(sweep_dir: Path, expect: Sequence[str] | None) -> list[dict[str, str]]:
    """The jobs the sweep was meant to run: ``--expect`` overrides, else ``multirun.yaml``'s sweep
    (the config's ``hydra.sweeper.params``, then the command line's overrides, which win).

    Only swept keys (values with a comma, or ranges) form the grid; fixed overrides are ignored.
    """
    if expect:
        items = list(expect)
    else:
        hydra_node = (_load_yaml(sweep_dir / "multirun.yaml") or {}).get("hydra", {}) or {}
        params = (hydra_node.get("sweeper", {}) or {}).get("params", {}) or {}
        items = [f"{k}={v}" for k, v in params.items()]
        items += list((hydra_node.get("overrides", {}) or {}).get("task", []) or [])
    axes: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item or item.startswith("~"):
            continue
        key, value = item.split("=", 1)
        values = _sweep_values(str(value))
        axes.pop(key.lstrip("+"), None)  # a later (command-line) value replaces the config's
        if len(values) > 1:
            axes[key.lstrip("+")] = values
    keys = list(axes)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes.values())]


def _sweep_values(value: str) -> list[str]:
    """Expand one hydra sweep value with hydra's own parser (``a,b``, ``range(..)``, ``choice(..)``)."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        override = OverridesParser.create().parse_override(f"k={value}")
        if override.is_sweep_override():
            return [str(v) for v in override.sweep_string_iterator()]
        return [value]
    except Exception:  # noqa: BLE001 - fall back to a plain comma split for unusual syntax
        return [v.strip() for v in value.split(",") if v.strip()]


def match_grid(runs: list[Run], grid: list[dict[str, str]]) -> list[dict[str, str]]:
    """Grid points with no run whose overrides match them (the missing jobs)."""
    missing = []
    for point in grid:
        if not any(all(_same(run.overrides.get(k), v) for k, v in point.items()) for run in runs):
            missing.append(point)
    return missing


def _same(a: str | None, b: str) -> bool:
    if a is None:
        return False
    if a == b:
        return True
    fa, fb = _to_float(a), _to_float(b)
    return fa is not None and fb is not None and fa == fb


# ----------------------------------------------------------------------------------------- the table
@dataclass
class Row:
    model: str
    tier: str
    num_slides: float | None
    params_m: float | None
    step: float | None
    images_seen: float | None
    pflops: float | None
    metric: float | None
    status: str
    run_dir: str


def pick_metric(runs: list[Run], metric: str) -> str | None:
    """``auto``: the first column (over all runs) that looks like a probe score, else a loss."""
    if metric != "auto":
        return metric
    columns = sorted({k for run in runs for k in run.metrics})
    for pattern in AUTO_METRICS:
        candidates = [c for c in columns if pattern in c.lower() and "step" not in c.lower()]
        if pattern == "loss":  # the total training loss if logged under a usual name
            total = [c for c in candidates if c.lower() in TOTAL_LOSS]
            candidates = total or candidates
        if candidates:
            return candidates[0]
    return None


def summarise(run: Run, metric: str | None) -> Row:
    model = run.choices.get("model") or str(_get(run.config, "model.name") or run.overrides.get("model", "?"))
    tier = run.overrides.get("data.tier") or str(_get(run.config, "data.tier"))
    m = run.metrics
    # status.json (ssl_path's GracefulStop) has the exact final step; the CSV only the last logged one.
    step = _to_float(run.status.get("global_step")) if run.status else m.get("step")
    images = _first(m, ("images_seen", "train/images_seen"))
    batch = _to_float(_get(run.config, "data.batch_size"))
    if images is None and step is not None and batch:
        world = (_to_float(_get(run.config, "trainer.devices")) or 1) * (
            _to_float(_get(run.config, "trainer.num_nodes")) or 1
        )
        images = step * batch * world
    slides = _first(m, ("num_slides", "data/num_slides", "train/num_slides"))
    if slides is None:
        slides = _slides_from_tier(run, tier)
    params, flops_per_image = model_costs(model, run.config)
    flops = _first(m, ("flops", "train/flops", "total_flops"))
    if flops is None and images is not None and flops_per_image:
        flops = flops_per_image * images
    value = m.get(metric) if metric else None
    return Row(
        model=model,
        tier=tier,
        num_slides=slides,
        params_m=round(params / 1e6, 3) if params else None,
        step=step,
        images_seen=images,
        pflops=round(flops / 1e15, 6) if flops else None,
        metric=value,
        status=_status(run, step),
        run_dir=str(run.run_dir),
    )


def _first(metrics: dict[str, float], keys: Sequence[str]) -> float | None:
    for key in keys:
        if key in metrics:
            return metrics[key]
    return None


def _status(run: Run, step: float | None) -> str:
    """done (trained to max_steps), stopped (graceful stop: a relaunch resumes it), incomplete."""
    if run.status.get("status") in ("stopped", "finished"):
        return {"stopped": "stopped", "finished": "done"}[run.status["status"]]
    if step is None:
        return "incomplete"
    max_steps = _to_float(_get(run.config, "trainer.max_steps"))
    if max_steps is None or max_steps < 0:
        return "done"
    # Without status.json: the CSV's last logged step is at most max_steps - 1.
    return "done" if step >= max_steps - 1 else "incomplete"


def _slides_from_tier(run: Run, tier: str) -> float | None:
    """Slides in the run's tier: ssl_path.data's own selection on the manifest when it is readable,
    else the count itself (an int tier) or the fraction (a float tier, when the manifest is gone)."""
    value = _parse_tier(tier)
    root = _get(run.config, "data.root")
    if value is not None and isinstance(root, str) and (Path(root) / "manifest.json").is_file():
        from ssl_path.data.manifest import load_manifest, select_slides

        seed = int(_to_float(_get(run.config, "data.tier_seed")) or 0)
        return float(len(select_slides(load_manifest(root), value, seed)))
    return None if value is None else float(value)


def _parse_tier(tier: str) -> float | int | None:
    """``"0.5"`` -> 0.5 (a fraction), ``"3"`` -> 3 (a count), as hydra parses the override."""
    try:
        return int(tier)
    except ValueError:
        return _to_float(tier)


def model_costs(model: str, config: dict) -> tuple[float | None, float | None]:
    """(backbone parameters, training FLOPs per image) of a run.

    FLOPs per image: student forward + backward (3x forward) on every crop, teacher forward on the
    global crops, the accounting of ``DINOv2Module.step_flops``; forward FLOPs come from the real
    backbone (``Backbone.flops_per_image``, counted on the meta device). Falls back to a closed-form
    ViT estimate when ssl_path cannot build the model.
    """
    aug = _get(config, "data.augmentation") or {}
    n_g = _to_float(aug.get("n_global_crops"))
    n_g = 2 if n_g is None else n_g
    n_l = _to_float(aug.get("n_local_crops"))
    n_l = 8 if n_l is None else n_l
    g_size = int(_to_float(aug.get("global_crop_size")) or 224)
    l_size = int(_to_float(aug.get("local_crop_size")) or 96)
    try:
        params, fwd = _backbone_costs(_get(config, "model.backbone") or {"name": model})
    except Exception:  # noqa: BLE001 - an unknown or unbuildable model: closed-form estimate instead
        params, fwd = _closed_form_costs(model)
    if params is None or fwd is None:
        return params, None
    return params, 3 * (n_g * fwd(g_size) + n_l * fwd(l_size)) + n_g * fwd(g_size)


def _backbone_costs(spec: dict) -> tuple[float, object]:
    import torch

    from ssl_path.models import create_backbone

    kwargs = {k: v for k, v in spec.items() if not k.startswith("_") and k != "pretrained_path"}
    with torch.device("meta"):
        backbone = create_backbone(**kwargs)
    params = float(sum(p.numel() for p in backbone.parameters()))
    return params, backbone.flops_per_image


def _closed_form_costs(model: str) -> tuple[float | None, object]:
    """Block parameters (4 + 2 * mlp_ratio) * D^2 per block and forward FLOPs
    2 * tokens * params + 4 * depth * tokens^2 * D (Kaplan et al. 2020), patch size from the name."""
    shape = next(
        (VIT_SHAPES[p] for p in sorted(VIT_SHAPES, key=len, reverse=True) if model.startswith(p)), None
    )
    if shape is None:
        return None, None
    dim, depth, mlp = shape
    patch = 14 if model.endswith("14") else 16
    params = depth * (4 + 2 * mlp) * dim * dim

    def fwd(size: int) -> float:
        tokens = (size // patch) ** 2 + 1
        return 2 * tokens * params + 4 * depth * tokens**2 * dim

    return float(params), fwd


# ---------------------------------------------------------------------------------------- outputs
def write_table(rows: list[Row], missing: list[dict[str, str]], metric: str | None, out: Path) -> str:
    """Write ``scaling.csv`` and ``scaling.md``; return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    fields = list(Row.__dataclass_fields__)
    with (out / "scaling.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
        for point in missing:
            writer.writerow(
                {
                    "model": point.get("model", ""),
                    "tier": point.get("data.tier", ""),
                    "status": "missing: " + " ".join(f"{k}={v}" for k, v in point.items()),
                }
            )
    head = [
        "model",
        "params (M)",
        "tier",
        "#slides",
        "steps",
        "images seen",
        "PFLOPs",
        metric or "metric",
        "status",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.model,
            _fmt(r.params_m),
            r.tier,
            _fmt(r.num_slides),
            _fmt(r.step),
            _fmt(r.images_seen),
            _fmt(r.pflops),
            _fmt(r.metric),
            r.status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if missing:
        lines.append("")
        lines.append(f"Missing jobs ({len(missing)}):")
        lines += ["- " + " ".join(f"{k}={v}" for k, v in point.items()) for point in missing]
    text = "\n".join(lines) + "\n"
    (out / "scaling.md").write_text(text)
    return text


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"


def plot(rows: list[Row], metric: str | None, out: Path) -> Path:
    """Two panels: metric vs #slides (one line per model) and metric vs training compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_data, ax_flops) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    params = {r.model: r.params_m or 0.0 for r in rows}
    models = sorted(params, key=lambda m: (params[m], m))
    for model in models:
        pts = sorted(
            (r for r in rows if r.model == model and r.metric is not None), key=lambda r: r.num_slides or 0.0
        )
        if not pts:
            continue
        label = f"{model} ({pts[0].params_m:.3g}M params)" if pts[0].params_m else model
        ax_data.plot([p.num_slides for p in pts], [p.metric for p in pts], marker="o", label=label)
        with_flops = [p for p in pts if p.pflops]
        # points only: with a fixed images-seen budget all tiers of a model share one compute value
        ax_flops.plot(
            [p.pflops for p in with_flops],
            [p.metric for p in with_flops],
            marker="s",
            linestyle="none",
            label=label,
        )
    slides = [r.num_slides for r in rows if r.num_slides]
    if slides and max(slides) >= 4 * min(slides):
        ax_data.set_xscale("log")  # tiers usually double: equal spacing per doubling
    ax_data.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_data.set_xlabel("training slides (data tier)")
    ax_flops.set_xlabel("training compute (PFLOPs: 3x student fwd + teacher fwd)")
    ax_flops.set_xscale("log")
    for ax in (ax_data, ax_flops):
        ax.set_ylabel(metric or "metric")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("ssl_path scaling sweep")
    path = out / "scaling.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def aggregate(sweep_dir: Path, out: Path, metric: str = "auto", expect: Sequence[str] | None = None) -> dict:
    """Read a sweep, write the table and plot; return a summary (rows, missing jobs, metric, paths)."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory not found: {sweep_dir}")
    runs = find_runs(sweep_dir)
    grid = expected_grid(sweep_dir, expect)
    missing = match_grid(runs, grid)
    chosen = pick_metric(runs, metric)
    rows = sorted(
        (summarise(r, chosen) for r in runs),
        key=lambda r: (r.params_m or 0.0, r.model, r.num_slides or 0.0),
    )
    markdown = write_table(rows, missing, chosen, out)
    png = plot(rows, chosen, out)
    return {"rows": rows, "missing": missing, "metric": chosen, "markdown": markdown, "png": png}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="hydra multirun dir (holds multirun.yaml and job dirs)")
    parser.add_argument("--out", type=Path, default=None, help="where to write scaling.{csv,md,png}")
    parser.add_argument("--metric", default="auto", help="metrics.csv column to plot (default: auto)")
    parser.add_argument(
        "--expect",
        nargs="*",
        default=None,
        help="sweep overrides defining the grid, e.g. model=vit_s14,vit_b14 data.tier=0.1,1",
    )
    args = parser.parse_args(argv)
    result = aggregate(args.sweep_dir, args.out or args.sweep_dir, args.metric, args.expect)
    print(result["markdown"], end="")
    print(f"plot: {result['png']}")
    if result["metric"] is None:
        print("warning: no metric column found in any run", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
