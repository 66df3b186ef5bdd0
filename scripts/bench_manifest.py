"""manifest.json at cluster scale: size on disk, the tiler's write, and the training side's load time.

Generates a manifest for ``--slides`` slides and ``--shards`` shards in the tiler's schema (entries
made with the tiler's own ``failed_entry``, assembled by ``build_manifest`` and written by
``save_manifest``, exactly as ``ssl-path-tile`` writes it), then times, each in a fresh process and
alternating rounds so machine noise hits both:

- the baseline: plain ``json.load`` of the file;
- ssl_path: ``ssl_path.data.load_manifest`` (read + schema validation), ``select_slides`` (the tier:
  every slide, ordered by hash) and ``select_shards`` (ShardRefs, validated again) — what every rank
  does in ``SSLDataModule.setup``.

The last line is ``ratio: <ssl_path total / json.load>`` in CPU seconds of the child (medians over
the rounds; on a shared machine wall time also counts other processes; it is printed too). Peak
memory is the child's max RSS above its RSS after imports; "kept" is the size of what the datamodule
keeps once the manifest dict is dropped (slide ids and ShardRefs, ``sys.getsizeof``), which every
DataLoader worker inherits. ``save_manifest`` of the whole manifest is timed once: the tiler rewrites the file
after every finished slide. Shards hold ``--tiles-per-shard`` tiles (the tiler's ``shard_max_count``)
except each slide's last one, which holds 1 to that many; slides get ``shards // slides`` shards or
one more.

    python scripts/bench_manifest.py                                  # 1.5 M slides, 2 M shards
    python scripts/bench_manifest.py --slides 2000 --shards 2600 --rounds 1   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def slide_id(i: int) -> str:
    return f"VS-{i:08d}-01A-01-TS1"


def make_slides(n_slides: int, n_shards: int, tiles_per_shard: int, seed: int = 0) -> dict[str, dict]:
    """Slide entries as ``tile_slide`` returns them for finished slides (a patient id as user metadata)."""
    import numpy as np

    from ssl_path.tiling.pipeline import failed_entry

    rng = np.random.default_rng(seed)
    base, extra = divmod(n_shards, n_slides)
    last = rng.integers(1, tiles_per_shard + 1, size=n_slides)  # the last shard of each slide
    slides = {}
    for i in range(n_slides):
        sid = slide_id(i)
        k = base + (1 if i < extra else 0)
        counts = [tiles_per_shard] * (k - 1) + [int(last[i])]
        entry = failed_entry(f"/lims/slides/{i % 1000:03d}/{sid}.svs", None, {"patient_id": f"P{i // 2:08d}"})
        tiles = sum(counts)
        candidates = int(tiles * 1.3) + 1
        entry.update(
            status="ok",
            tiles=tiles,
            mpp=0.2527,
            mpp_source="metadata",
            shards=[{"path": f"{sid}-{j:06d}.tar", "num_samples": c} for j, c in enumerate(counts)],
            per_mpp={"0.5": {"level": 0, "grid": [int(candidates**0.5) + 1] * 2, "candidates": candidates}},
            seconds=round(float(rng.uniform(5, 60)), 3),
        )
        entry["per_mpp"]["0.5"]["tiles"] = tiles
        slides[sid] = entry
    return slides


def tiling_config(tiles_per_shard: int) -> dict:
    from dataclasses import asdict

    from ssl_path.tiling import TilingConfig

    cfg = asdict(TilingConfig(target_mpps=[0.5], shard_max_count=tiles_per_shard))
    return json.loads(json.dumps(cfg))  # tuples -> lists, as it reads back


# ------------------------------------------------------------------------------------------ children
def child_generate(out: Path, n_slides: int, n_shards: int, tiles_per_shard: int) -> dict:
    from ssl_path.tiling.manifest import build_manifest, save_manifest

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    slides = make_slides(n_slides, n_shards, tiles_per_shard)
    t1 = time.perf_counter()
    last_run = {"ok": n_slides, "failed": 0, "skipped": 0, "tiles_written": 0, "seconds": 0.0}
    manifest = build_manifest(tiling_config(tiles_per_shard), slides, last_run)
    t2, c2 = time.perf_counter(), time.process_time()
    path = save_manifest(out, manifest)
    t3, c3 = time.perf_counter(), time.process_time()
    return {
        "bytes": path.stat().st_size,
        "tiles": sum(s["num_samples"] for s in manifest["shards"]),
        "shards": len(manifest["shards"]),
        "slides": len(manifest["slides"]),
        "make_s": t1 - t0,
        "build_manifest_s": t2 - t1,
        "save_manifest_s": t3 - t2,
        "save_manifest_cpu_s": c3 - c2,
    }


def child_json(root: Path) -> dict:
    base = _rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    with open(root / "manifest.json") as f:
        m = json.load(f)
    t1, c1 = time.perf_counter(), time.process_time()
    return {
        "load_s": t1 - t0,
        "total_s": t1 - t0,
        "cpu_s": c1 - c0,
        "peak_mb": _peak_mb() - base,
        "slides": len(m["slides"]),
    }


def child_ssl_path(root: Path) -> dict:
    from ssl_path.data import load_manifest, select_shards, select_slides

    base = _rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    m = load_manifest(str(root))
    t1 = time.perf_counter()
    slides = select_slides(m, 1.0)
    t2 = time.perf_counter()
    shards = select_shards(m, str(root), slides)
    t3, c3 = time.perf_counter(), time.process_time()
    del m
    kept = sys.getsizeof(shards) + sys.getsizeof(slides) + sum(map(sys.getsizeof, slides))
    kept += sum(sys.getsizeof(r) + sys.getsizeof(r.path) + sys.getsizeof(r.num_samples) for r in shards)
    return {
        "load_s": t1 - t0,
        "select_slides_s": t2 - t1,
        "select_shards_s": t3 - t2,
        "total_s": t3 - t0,
        "cpu_s": c3 - c0,
        "peak_mb": _peak_mb() - base,
        "kept_mb": kept / 2**20,  # the tier's slide ids and ShardRefs, which the rank (and workers) keep
        "slides": len(slides),
        "shards": len(shards),
    }


def _child(kind: str, *args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--child", kind, *args], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise SystemExit(f"child {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slides", type=int, default=1_500_000)
    p.add_argument("--shards", type=int, default=2_000_000)
    p.add_argument("--tiles-per-shard", type=int, default=1000, help="the tiler's shard_max_count")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="where to write it (default: a temp dir, removed)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        if a.child == "generate":
            res = child_generate(a.root, a.slides, a.shards, a.tiles_per_shard)
        else:
            res = {"json": child_json, "ssl_path": child_ssl_path}[a.child](a.root)
        print(json.dumps(res))
        return
    if not a.slides <= a.shards:
        raise SystemExit("need --slides <= --shards (every finished slide has a shard)")

    tmp = None if a.out else Path(tempfile.mkdtemp(prefix="bench_manifest-"))
    root = a.out or tmp
    try:
        sizes = (
            "--slides",
            str(a.slides),
            "--shards",
            str(a.shards),
            "--tiles-per-shard",
            str(a.tiles_per_shard),
        )
        gen = _child("generate", "--root", str(root), *sizes)
        print(
            f"manifest: {gen['slides']:,} slides, {gen['shards']:,} shards, {gen['tiles']:,} tiles; "
            f"{gen['bytes'] / 2**20:,.1f} MiB on disk ({gen['bytes'] / gen['slides']:.0f} B/slide)"
        )
        print(
            f"tiler side, once: entries {gen['make_s']:.1f} s, build_manifest "
            f"{gen['build_manifest_s']:.1f} s, save_manifest {gen['save_manifest_s']:.1f} s "
            f"({gen['save_manifest_cpu_s']:.1f} s CPU)"
        )
        runs: dict[str, list[dict]] = {"json": [], "ssl_path": []}
        for r in range(a.rounds):
            for kind in ("json", "ssl_path"):
                res = _child(kind, "--root", str(root))
                runs[kind].append(res)
                detail = ", ".join(f"{k} {v:.2f}" for k, v in res.items() if k.endswith("_s"))
                kept = f", kept +{res['kept_mb']:,.0f} MiB" if "kept_mb" in res else ""
                print(f"round {r} {kind:8s}: {detail}; peak +{res['peak_mb']:,.0f} MiB{kept}", flush=True)
        med = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in runs.items()}
        j, s = med["json"], med["ssl_path"]
        print(
            f"median: json.load {j['total_s']:.2f} s (+{j['peak_mb']:,.0f} MiB); ssl_path load_manifest "
            f"{s['load_s']:.2f} s + select_slides {s['select_slides_s']:.2f} s + select_shards "
            f"{s['select_shards_s']:.2f} s = {s['total_s']:.2f} s (+{s['peak_mb']:,.0f} MiB)"
        )
        print(json.dumps({"generate": gen, "median": med, "rounds": runs}))
        print(f"CPU seconds: json.load {j['cpu_s']:.2f}, ssl_path {s['cpu_s']:.2f}")
        print(
            f"wall: load_manifest / json.load {s['load_s'] / j['total_s']:.2f}, total / json.load "
            f"{s['total_s'] / j['total_s']:.2f}"
        )
        print(f"ratio: {s['cpu_s'] / j['cpu_s']:.2f}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
