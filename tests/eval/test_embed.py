"""ssl-path-embed on the bundled slides with a real 2-step smoke checkpoint: one HDF5 file per slide whose
coords are the tiler's and whose features are the backbone's on the tiler's tiles; resume, corrupt
slides, a tiled dataset as input, the console script and the SLURM array template."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ssl_path.eval.backbone import load_backbone, resolve_checkpoint
from ssl_path.eval.embed import (
    EmbedConfig,
    embed_slides,
    load_encoder,
    read_slide_h5,
    shard_inputs,
    slide_inputs,
)
from ssl_path.eval.features import pool_tokens
from ssl_path.eval.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from ssl_path.tiling import (
    TilingConfig,
    find_slides,
    open_slide,
    resolve_mpp,
    slide_ids,
    tile_grid,
    tile_slides,
)
from ssl_path.tiling.reader import best_level, read_tiles
from tests.helpers.run_if import RunIf
from tests.train.runs import REPO

# 112 px tiles at 0.5 µm/px, 12 per slide: the tiler's sampling keeps the test fast on 2 CPUs.
# The bundled TCGA slide records no mpp: the tiler's fallback (40x) is used, as tiling=tcga does.
TILING = TilingConfig(target_mpps=[0.5], tile_size=112, fallback_mpp=0.25, max_tiles_per_slide=12)
GOOD = ("CMU-1-Small-Region", "CMU-1-Small-Region-pyramid", "TCGA-CR-7395-01A-01-TS1")


@pytest.fixture(scope="module")
def smoke_ckpt(smoke_run) -> Path:
    """``last.ckpt`` of the session's real 2-step ssl-path-train smoke run (ViT-Ti/16 at 64 px)."""
    return smoke_run / "checkpoints" / "last.ckpt"


def _embed(slides_dir: Path, ckpt: Path, out: Path, **embed_kw) -> dict:
    encoder, info = load_encoder(ckpt, EmbedConfig(batch_size=5, **embed_kw))
    inputs = slide_inputs(slide_ids(find_slides(slides_dir)), TILING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return embed_slides(inputs, out, encoder, info, TILING.to_dict(), progress=False)


@pytest.fixture(scope="module")
def embedded(slides_dir, smoke_ckpt, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("embedded")
    return out, _embed(slides_dir, smoke_ckpt, out)


def _tiler_coords(manifest: dict, root: Path) -> dict[str, np.ndarray]:
    """Level-0 (x, y) of each slide's samples, in shard order, from the tiler's own output."""
    out = {}
    for sid, entry in manifest["slides"].items():
        xy = []
        for shard in entry["shards"]:
            with tarfile.open(root / "shards" / shard["path"]) as tar:
                for m in tar:
                    if m.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(m).read())
                        xy.append((meta["x"], meta["y"]))
        out[sid] = np.array(xy, dtype=np.int64).reshape(-1, 2)
    return out


def _reference_features(path: Path, coords: np.ndarray, ckpt: Path, pooling: str = "cls") -> np.ndarray:
    """The backbone (loaded by ssl-path-eval's loader) on the tiles at ``coords``, read by the tiler's
    reader and given ssl-path-eval's view: no code of ssl_path.eval.embed involved."""
    backbone = load_backbone(ckpt)
    mean, std = resolve_checkpoint(ckpt, None).normalisation or (IMAGENET_MEAN, IMAGENET_STD)
    tf = eval_transform(backbone.vit.patch_embed.img_size[0], mean=mean, std=std)
    with open_slide(path) as slide:
        mpp = resolve_mpp(dict(slide.properties), TILING.fallback_mpp).mpp
        grid = tile_grid(*slide.dimensions, mpp, 0.5, TILING.tile_size)
        index = np.stack([np.searchsorted(grid.ys, coords[:, 1]), np.searchsorted(grid.xs, coords[:, 0])], 1)
        assert (grid.xs[index[:, 1]] == coords[:, 0]).all() and (grid.ys[index[:, 0]] == coords[:, 1]).all()
        level = best_level(slide, 0.5 / mpp)
        tiles = dict(read_tiles(slide, grid, index, level, TILING.read_block, TILING.resample))
    x = torch.stack([tf(Image.fromarray(tiles[k])) for k in range(len(coords))])
    with torch.no_grad():
        return pool_tokens(backbone(x), pooling).numpy()


def test_one_file_per_slide_with_the_tilers_coords_and_the_backbones_features(
    embedded, slides_dir, smoke_ckpt, tmp_path
):
    out, manifest = embedded
    assert sorted(p.name for p in out.glob("*.h5")) == sorted(f"{s}.h5" for s in GOOD)
    assert not list(out.glob(".*tmp*")), "a temp file was left behind"
    assert manifest["last_run"] | {"seconds": 0, "tiles_per_second": 0} == {
        "done": 3, "failed": 1, "skipped": 0, "tiles": 36, "seconds": 0, "tiles_per_second": 0,
    }  # fmt: skip
    # the tiler on the same slides with the same config: the same tiles, in the same order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiled = tile_slides(find_slides(slides_dir), tmp_path / "tiles", TILING, progress=False)
    tiler_xy = _tiler_coords(tiled, tmp_path / "tiles")
    sha = hashlib.sha256(smoke_ckpt.read_bytes()).hexdigest()
    for sid in GOOD:
        feats, coords, attrs = read_slide_h5(out / f"{sid}.h5")
        assert feats.shape == (12, 192) and feats.dtype == np.float32 and coords.dtype == np.int64
        np.testing.assert_array_equal(coords, tiler_xy[sid])
        ref = _reference_features(Path(manifest["slides"][sid]["source"]), coords, smoke_ckpt)
        np.testing.assert_allclose(feats, ref, atol=1e-5, rtol=0)
        assert attrs["mpp"] == 0.5 and attrs["tile_size"] == 112 and attrs["model"] == "vit_tiny"
        assert attrs["level"] == tiled["slides"][sid]["per_mpp"]["0.5"]["level"]
        assert attrs["checkpoint_sha256"] == sha and attrs["pooling"] == "cls"
        assert attrs["config_hash"] == manifest["config_hash"] == manifest["slides"][sid]["config_hash"]
        with h5py.File(out / f"{sid}.h5") as f:  # what CLAM / TRIDENT readers look up
            assert f["coords"].attrs["patch_size"] == 112
            assert f["coords"].attrs["patch_size_level0"] == round(attrs["extent"])
    tcga = read_slide_h5(out / "TCGA-CR-7395-01A-01-TS1.h5")[2]
    assert (tcga["mpp_source"], tcga["slide_mpp"], tcga["extent"]) == ("fallback", 0.25, 224.0)
    assert any("fallback_mpp" in w for w in manifest["slides"]["TCGA-CR-7395-01A-01-TS1"]["warnings"])


def test_broken_slide_is_reported_and_the_others_done(embedded):
    out, manifest = embedded
    broken = manifest["slides"]["broken"]
    assert broken["status"] == "failed" and "corrupt" in broken["reason"] and broken["file"] is None
    assert all(manifest["slides"][s]["status"] == "done" for s in GOOD)
    assert json.loads((out / "manifest.json").read_text())["slides"]["broken"]["status"] == "failed"


def test_resume_skips_finished_slides_and_redoes_missing_or_changed(slides_dir, smoke_ckpt, tmp_path):
    out = tmp_path / "feats"
    first = _embed(slides_dir, smoke_ckpt, out)
    stamp = {s: (out / f"{s}.h5").stat().st_mtime_ns for s in GOOD}
    again = _embed(slides_dir, smoke_ckpt, out)
    assert (again["last_run"]["skipped"], again["last_run"]["done"], again["last_run"]["failed"]) == (3, 0, 1)
    assert {s: (out / f"{s}.h5").stat().st_mtime_ns for s in GOOD} == stamp  # untouched
    (out / f"{GOOD[0]}.h5").unlink()  # a lost file is redone, alone
    third = _embed(slides_dir, smoke_ckpt, out)
    assert (third["last_run"]["skipped"], third["last_run"]["done"]) == (2, 1)
    # another pooling is another config: every slide redone; cls+mean = [cls, mean patch token]
    cls = read_slide_h5(out / f"{GOOD[2]}.h5")[0]
    fourth = _embed(slides_dir, smoke_ckpt, out, pooling="cls+mean")
    assert (fourth["last_run"]["skipped"], fourth["last_run"]["done"]) == (0, 3)
    assert fourth["config_hash"] != first["config_hash"]
    both, coords, attrs = read_slide_h5(out / f"{GOOD[2]}.h5")
    assert both.shape == (12, 384) and attrs["pooling"] == "cls+mean"
    np.testing.assert_allclose(both[:, :192], cls, atol=1e-5, rtol=0)
    src = Path(fourth["slides"][GOOD[2]]["source"])
    np.testing.assert_allclose(
        both[:, 192:], _reference_features(src, coords, smoke_ckpt, "cls+mean")[:, 192:], atol=1e-5, rtol=0
    )


def test_flips_average_the_four_flipped_views(smoke_ckpt):
    plain, _ = load_encoder(smoke_ckpt, EmbedConfig())
    flips, _ = load_encoder(smoke_ckpt, EmbedConfig(flips=True))
    x = torch.rand(3, 3, 64, 64)
    views = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    expected = np.mean([plain(v) for v in views], axis=0)
    np.testing.assert_allclose(flips(x), expected, atol=1e-5, rtol=0)
    assert not np.allclose(plain(x), expected, atol=1e-4)


def test_tiled_dataset_input_reads_the_shards(slides_dir, smoke_ckpt, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiled = tile_slides(find_slides(slides_dir), tmp_path / "tiles", TILING, progress=False)
    encoder, info = load_encoder(smoke_ckpt, EmbedConfig(batch_size=7))
    inputs, recorded = shard_inputs(tmp_path / "tiles")
    assert sorted(i.slide_id for i in inputs) == list(GOOD)  # the tiler's failed slide is not there
    manifest = embed_slides(inputs, tmp_path / "feats", encoder, info, recorded, progress=False)
    assert manifest["last_run"]["done"] == 3
    tiler_xy = _tiler_coords(tiled, tmp_path / "tiles")
    entry = tiled["slides"][GOOD[0]]
    jpegs = []
    for shard in entry["shards"]:
        with tarfile.open(tmp_path / "tiles" / "shards" / shard["path"]) as tar:
            jpegs += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    x = torch.stack([encoder.preprocess(np.asarray(Image.open(io.BytesIO(j)).convert("RGB"))) for j in jpegs])
    backbone = load_backbone(smoke_ckpt)
    with torch.no_grad():
        ref = pool_tokens(backbone(x), "cls").numpy()
    for sid in GOOD:
        feats, coords, attrs = read_slide_h5(tmp_path / "feats" / f"{sid}.h5")
        np.testing.assert_array_equal(coords, tiler_xy[sid])
        assert attrs["input"] == "shards" and attrs["mpp"] == 0.5 and attrs["tile_size"] == 112
    np.testing.assert_allclose(read_slide_h5(tmp_path / "feats" / f"{GOOD[0]}.h5")[0], ref, atol=1e-5, rtol=0)


@RunIf(min_gpus=1)
def test_bf16_on_cuda_stays_close_to_fp32_on_cpu(embedded, slides_dir, smoke_ckpt, tmp_path):
    out, cpu_manifest = embedded
    gpu_manifest = _embed(slides_dir, smoke_ckpt, tmp_path / "gpu", device="cuda")
    assert gpu_manifest["config"]["encoder"]["precision"] == "bf16"
    for sid in GOOD:
        cpu, cpu_xy, _ = read_slide_h5(out / f"{sid}.h5")
        gpu, gpu_xy, attrs = read_slide_h5(tmp_path / "gpu" / f"{sid}.h5")
        assert attrs["precision"] == "bf16" and gpu.dtype == np.float32
        np.testing.assert_array_equal(cpu_xy, gpu_xy)
        cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
        assert cos.min() > 0.99


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MAX", "SLURM_JOB_ID", "SLURM_CPUS_PER_TASK"):
        env.pop(key, None)
    return env


TILING_ARGS = ["tiling=tcga", "tiling.tile_size=112", "tiling.max_tiles_per_slide=4"]


def test_console_script_embeds_a_folder_and_resumes(slides_dir, smoke_ckpt, tmp_path):
    exe = Path(sys.executable).parent / "ssl-path-embed"
    out = tmp_path / "feats"
    args = [
        str(exe),
        f"checkpoint={smoke_ckpt.parents[1]}",
        f"input={slides_dir}",
        f"output={out}",
        *TILING_ARGS,
    ]
    proc = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tile/s" in proc.stderr  # the progress bar
    assert "3 slide(s) done, 1 failed, 0 skipped" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v["status"] for k, v in manifest["slides"].items()} == dict.fromkeys(GOOD, "done") | {
        "broken": "failed"
    }
    assert read_slide_h5(out / f"{GOOD[0]}.h5")[0].shape == (4, 192)
    assert (out / "hydra" / "task-0" / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_slurm_array_template_splits_slides_into_one_output(slides_dir, smoke_ckpt, tmp_path):
    listing = tmp_path / "slides.csv"
    with listing.open("w", newline="") as f:
        csv.writer(f).writerows(
            [["path"], [slides_dir / "CMU-1-Small-Region.svs"], [slides_dir / "broken.svs"]]
        )
    out = tmp_path / "feats"
    logs = []
    for task in (0, 1):  # what `sbatch --array=0-1` runs, one task after the other
        env = _env() | {
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_MAX": "1",
            "SSL_PATH_PYTHON": sys.executable,
        }
        script = [str(REPO / "slurm" / "embed_array.sbatch"), str(smoke_ckpt), str(listing), str(out)]
        proc = subprocess.run(
            ["bash", *script, *TILING_ARGS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        logs.append(proc)
    assert logs[0].returncode == 0, logs[0].stderr[-3000:]
    assert logs[1].returncode == 1  # its only slide (broken.svs) failed
    assert "task 1 of 2" in logs[1].stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v["status"] for k, v in manifest["slides"].items()} == {
        "CMU-1-Small-Region": "done",
        "broken": "failed",
    }


def test_csv_mpp_reaches_the_embedding_as_in_the_tiler(slides_dir, smoke_ckpt, tmp_path):
    """An input CSV that gives the TCGA slide's mpp (it records none) embeds it without fallback_mpp,
    with mpp_source "csv" and the tiler's extent at that mpp, as ssl-path-tile would tile it."""
    from ssl_path.tiling import find_slide_records, record_ids

    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp,patient_id\n{slides_dir / 'TCGA-CR-7395-01A-01-TS1.svs'},0.25,P7\n")
    no_fallback = TilingConfig(target_mpps=[0.5], tile_size=112, max_tiles_per_slide=4)
    encoder, info = load_encoder(smoke_ckpt, EmbedConfig(batch_size=4))
    inputs = slide_inputs(record_ids(find_slide_records(table)), no_fallback)
    manifest = embed_slides(inputs, tmp_path / "out", encoder, info, no_fallback.to_dict(), progress=False)
    assert manifest["slides"]["TCGA-CR-7395-01A-01-TS1"]["status"] == "done"
    with h5py.File(tmp_path / "out" / "TCGA-CR-7395-01A-01-TS1.h5") as f:
        assert (f.attrs["mpp_source"], f.attrs["slide_mpp"], f.attrs["extent"]) == ("csv", 0.25, 224.0)
        assert f["features"].shape[0] == 4
