"""End to end on the real slides: shards, manifest, resume, failures, sampling, magnifications, workers."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ssl_path.tiling import TilingConfig, TilingWarning, tile_slides
from ssl_path.tiling.writer import SlideShardWriter

CMU = "CMU-1-Small-Region.svs"
TIFF = "CMU-1-Small-Region-pyramid.tiff"
TCGA = "TCGA-CR-7395-01A-01-TS1.svs"
JSON_KEYS = {"slide_id", "x", "y", "level", "mpp", "tile_size", "source", "tissue_fraction", "target_mpp"}


def _samples(root: Path, manifest: dict, slide_id: str | None = None) -> list[dict]:
    urls = [
        str(root / s["path"]) for s in manifest["shards"] if slide_id is None or s["slide_ids"] == [slide_id]
    ]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _cfg(**kw) -> TilingConfig:
    return TilingConfig(**({"shard_max_count": 16} | kw))


def test_shards_readable_by_plain_webdataset(tiled_root: Path) -> None:
    manifest = json.loads((tiled_root / "manifest.json").read_text())
    samples = _samples(tiled_root, manifest)
    assert len(samples) == sum(s["num_samples"] for s in manifest["shards"]) > 50
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys)
    for s in samples:
        assert set(s) >= {"__key__", "jpg", "json"}
        meta = json.loads(s["json"])
        assert set(meta) >= JSON_KEYS
        assert s["__key__"] == f"{meta['slide_id']}_{meta['level']}_{meta['x']}_{meta['y']}"
        assert meta["tile_size"] == 224 and meta["target_mpp"] == 0.5
        assert meta["tissue_fraction"] >= 0.5
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.size == (224, 224) and img.mode == "RGB"
    by_slide = {json.loads(s["json"])["slide_id"] for s in samples}
    assert by_slide == {"CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1"}


def test_svs_and_pyramid_tiff_give_the_same_tiles(slides_dir: Path, tmp_path: Path) -> None:
    manifest = tile_slides([slides_dir / CMU, slides_dir / TIFF], tmp_path, _cfg(), progress=False)
    a, b = (manifest["slides"][k] for k in ("CMU-1-Small-Region", "CMU-1-Small-Region-pyramid"))
    assert a["per_mpp"]["0.5"]["grid"] == b["per_mpp"]["0.5"]["grid"] == [9, 13]
    tiles = {}
    for sid in ("CMU-1-Small-Region", "CMU-1-Small-Region-pyramid"):
        for s in _samples(tmp_path, manifest, sid):
            meta = json.loads(s["json"])
            tiles.setdefault(sid, {})[(meta["x"], meta["y"])] = np.asarray(Image.open(io.BytesIO(s["jpg"])))
    svs, tiff = tiles.values()
    assert len(svs) > 30
    assert set(svs) == set(tiff)  # same coordinates kept
    for xy in svs:  # and the same image content (the TIFF is a re-encode: small differences)
        assert np.abs(svs[xy].astype(int) - tiff[xy].astype(int)).mean() < 8


def test_tcga_tiles_via_fallback_with_warning(slides_dir: Path, tmp_path: Path) -> None:
    with pytest.warns(TilingWarning, match="fallback_mpp=0.25"):
        manifest = tile_slides([slides_dir / TCGA], tmp_path, _cfg(fallback_mpp=0.25), progress=False)
    entry = manifest["slides"]["TCGA-CR-7395-01A-01-TS1"]
    assert entry["status"] == "ok" and entry["mpp_source"] == "fallback" and entry["mpp"] == 0.25
    assert entry["tiles"] > 20 and entry["per_mpp"]["0.5"]["level"] == 1  # 2x downsample → level 1
    assert any("fallback_mpp" in w for w in entry["warnings"])


@pytest.mark.filterwarnings("ignore::ssl_path.tiling.TilingWarning")
@pytest.mark.parametrize("name", [CMU, TCGA])
def test_thumbnail_mask_skips_background_but_no_tissue_tile(
    slides_dir: Path, tmp_path: Path, name: str
) -> None:
    everything = tile_slides(
        [slides_dir / name], tmp_path / "a", _cfg(mask_min_coverage=0.0, fallback_mpp=0.25)
    )
    masked = tile_slides([slides_dir / name], tmp_path / "m", _cfg(fallback_mpp=0.25), progress=False)
    (e,), (m,) = everything["slides"].values(), masked["slides"].values()
    assert m["per_mpp"]["0.5"]["candidates"] < 0.9 * e["per_mpp"]["0.5"]["candidates"]  # background not read
    keys = [
        {s["__key__"] for s in _samples(root, man)}
        for root, man in ((tmp_path / "a", everything), (tmp_path / "m", masked))
    ]
    assert keys[0] == keys[1] and len(keys[0]) > 40


def test_slide_without_mpp_or_fallback_fails_with_reason(slides_dir: Path, tmp_path: Path) -> None:
    manifest = tile_slides([slides_dir / TCGA], tmp_path, _cfg(), progress=False)
    entry = manifest["slides"]["TCGA-CR-7395-01A-01-TS1"]
    assert entry["status"] == "failed" and "fallback_mpp" in entry["reason"] and entry["tiles"] == 0
    assert manifest["shards"] == [] and not list((tmp_path / "shards").glob("*.tar"))


def test_rerun_skips_done_slides_and_retries_failed(slides_dir: Path, tmp_path: Path) -> None:
    slides = [slides_dir / CMU, slides_dir / "broken.svs"]
    first = tile_slides(slides, tmp_path, _cfg(), progress=False)
    assert first["last_run"] | {"seconds": 0} == {
        "ok": 1,
        "failed": 1,
        "skipped": 0,
        "tiles_written": 50,
        "seconds": 0,
    }
    assert first["slides"]["broken"]["status"] == "failed"
    assert "unsupported or corrupt" in first["slides"]["broken"]["reason"]
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    second = tile_slides(slides, tmp_path, _cfg(), progress=False)
    assert second["last_run"]["skipped"] == 1 and second["last_run"]["ok"] == 0
    assert second["last_run"]["failed"] == 1 and second["last_run"]["tiles_written"] == 0  # broken retried
    assert {p.name: p.stat().st_mtime_ns for p in sorted((tmp_path / "shards").glob("*.tar"))} == stamps
    assert second["slides"]["CMU-1-Small-Region"] == first["slides"]["CMU-1-Small-Region"]
    assert second["shards"] == first["shards"]


def test_missing_shard_or_interrupted_slide_is_redone(slides_dir: Path, tmp_path: Path) -> None:
    first = tile_slides([slides_dir / CMU], tmp_path, _cfg(), progress=False)
    shards = tmp_path / "shards"
    (shards / first["shards"][0]["path"].split("/")[-1]).unlink()  # a lost shard
    (shards / ".tmp-CMU-1-Small-Region").mkdir()  # leftovers of a killed run
    (shards / ".tmp-CMU-1-Small-Region" / "CMU-1-Small-Region-000000.tar").write_bytes(b"partial")
    again = tile_slides([slides_dir / CMU], tmp_path, _cfg(), progress=False)
    assert again["last_run"]["ok"] == 1 and again["last_run"]["tiles_written"] == 50
    assert again["shards"] == first["shards"]
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        s["path"].split("/")[-1] for s in first["shards"]
    )


def test_uncommitted_writer_leaves_no_final_shards(tmp_path: Path) -> None:
    writer = SlideShardWriter(tmp_path, "s", max_count=2, max_size=10**9)
    for i in range(5):
        writer.write(f"s_0_{i}_0", b"jpg", {"i": i})
    assert not list(tmp_path.glob("*.tar"))  # a kill here leaves only the temp dir
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    writer = SlideShardWriter(tmp_path, "s", max_count=2, max_size=10**9)
    for i in range(5):
        writer.write(f"s_0_{i}_0", b"jpg", {"i": i})
    shards = writer.commit()
    assert [s["num_samples"] for s in shards] == [2, 2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    with pytest.raises(ValueError, match="dot"):
        SlideShardWriter(tmp_path, "t", 2, 10**9).write("a.b", b"", {})


def test_max_tiles_per_slide_is_deterministic(slides_dir: Path, tmp_path: Path) -> None:
    def samples(out: Path, seed: int) -> dict[str, bytes]:
        m = tile_slides([slides_dir / TIFF], out, _cfg(max_tiles_per_slide=10, seed=seed), progress=False)
        assert m["slides"]["CMU-1-Small-Region-pyramid"]["tiles"] == 10
        return {s["__key__"]: s["jpg"] for s in _samples(out, m)}

    a, b, c = samples(tmp_path / "a", 0), samples(tmp_path / "b", 0), samples(tmp_path / "c", 1)
    assert a == b and set(a) != set(c) and len(a) == 10
    full = tile_slides([slides_dir / TIFF], tmp_path / "full", _cfg(), progress=False)
    everything = {s["__key__"]: s["jpg"] for s in _samples(tmp_path / "full", full)}
    assert all(everything[k] == v for k, v in a.items())  # a subset of the full run, pixel for pixel


def test_mixed_magnification(slides_dir: Path, tmp_path: Path) -> None:
    manifest = tile_slides([slides_dir / TIFF], tmp_path, _cfg(target_mpps=[0.5, 1.0]), progress=False)
    per = manifest["slides"]["CMU-1-Small-Region-pyramid"]["per_mpp"]
    assert per["0.5"]["level"] == 0 and per["1"]["level"] == 1
    metas = [json.loads(s["json"]) for s in _samples(tmp_path, manifest)]
    keys = [s["__key__"] for s in _samples(tmp_path, manifest)]
    assert len(set(keys)) == len(keys) and all(k.endswith(("_500nm", "_1000nm")) for k in keys)
    by_mpp = {m: [x for x in metas if x["target_mpp"] == m] for m in (0.5, 1.0)}
    assert len(by_mpp[0.5]) == per["0.5"]["tiles"] > 3 * len(by_mpp[1.0]) > 0
    assert by_mpp[1.0][0]["extent"] == pytest.approx(2 * by_mpp[0.5][0]["extent"], rel=1e-3)


def test_worker_pool_and_threads_match_single_process_byte_for_byte(slides_dir: Path, tmp_path: Path) -> None:
    slides = [slides_dir / CMU, slides_dir / TIFF, slides_dir / "broken.svs"]
    one = tile_slides(slides, tmp_path / "one", _cfg(threads=1), workers=1, progress=False)
    two = tile_slides(slides, tmp_path / "two", _cfg(threads=3), workers=2, progress=False)
    assert two["last_run"]["ok"] == 2 and two["last_run"]["failed"] == 1
    assert one["shards"] == two["shards"]
    for shard in one["shards"]:
        assert (tmp_path / "one" / shard["path"]).read_bytes() == (
            tmp_path / "two" / shard["path"]
        ).read_bytes()


def test_changed_config_refuses_to_mix(slides_dir: Path, tmp_path: Path) -> None:
    tile_slides([slides_dir / CMU], tmp_path, _cfg(), progress=False)
    with pytest.raises(ValueError, match="another tiling config"):
        tile_slides([slides_dir / CMU], tmp_path, _cfg(tile_size=256), progress=False)
    again = tile_slides([slides_dir / CMU], tmp_path, _cfg(threads=5), progress=False)  # speed only: fine
    assert again["last_run"]["skipped"] == 1


def test_concurrent_tilers_share_one_output(slides_dir: Path, tmp_path: Path) -> None:
    """Two tilers (as in a SLURM array job) writing one folder: the merged manifest has both slides."""
    jobs = [[slides_dir / CMU], [slides_dir / TIFF]]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: tile_slides(s, tmp_path, _cfg(), progress=False), jobs))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {k: v["status"] for k, v in manifest["slides"].items()} == {
        "CMU-1-Small-Region": "ok",
        "CMU-1-Small-Region-pyramid": "ok",
    }
    assert len(_samples(tmp_path, manifest)) == 100
    # no temp leftovers
    assert sorted(os.listdir(tmp_path)) == [".manifest.lock", "manifest.json", "qc", "shards"]


def test_shard_size_limit_and_jpeg_quality(slides_dir: Path, tmp_path: Path) -> None:
    small = _cfg(shard_max_count=1000, shard_max_size=60_000, jpeg_quality=95, max_tiles_per_slide=12)
    manifest = tile_slides([slides_dir / CMU], tmp_path / "hq", small, progress=False)
    sizes = [(tmp_path / "hq" / s["path"]).stat().st_size for s in manifest["shards"]]
    assert len(sizes) > 2 and sum(s["num_samples"] for s in manifest["shards"]) == 12
    largest_sample = max(len(s["jpg"]) + len(s["json"]) + 2048 for s in _samples(tmp_path / "hq", manifest))
    assert all(
        size <= 60_000 + largest_sample + 10_240 for size in sizes
    )  # a shard closes once over the limit
    low = tile_slides(
        [slides_dir / CMU], tmp_path / "lq", _cfg(jpeg_quality=30, max_tiles_per_slide=12), progress=False
    )
    hq = {s["__key__"]: len(s["jpg"]) for s in _samples(tmp_path / "hq", manifest)}
    lq = {s["__key__"]: len(s["jpg"]) for s in _samples(tmp_path / "lq", low)}
    assert hq.keys() == lq.keys() and all(lq[k] < 0.6 * hq[k] for k in hq)


def _copies(src: Path, *dests: Path) -> list[Path]:
    for d in dests:
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, d)
    return [d.resolve() for d in dests]


def test_ids_that_sanitise_alike_are_both_tiled_across_runs(slides_dir: Path, tmp_path: Path) -> None:
    """Issue 12: ``case 7.svs`` then ``case-7.svs`` (both sanitise to ``case-7``) into one output: the
    second run tiles its slide under another id, loudly, instead of skipping it as done."""
    spaced, dashed = _copies(slides_dir / CMU, tmp_path / "in" / "case 7.svs", tmp_path / "in" / "case-7.svs")
    out, cfg = tmp_path / "out", _cfg(max_tiles_per_slide=4)
    tile_slides([spaced], out, cfg, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = tile_slides([dashed], out, cfg, progress=False)
    assert second["last_run"] | {"seconds": 0} == {
        "ok": 1,
        "failed": 0,
        "skipped": 0,
        "tiles_written": 4,
        "seconds": 0,
    }
    slides = second["slides"]
    new_id = next(sid for sid, v in slides.items() if v["source"] == str(dashed))
    assert slides["case-7"]["source"] == str(spaced) and re.fullmatch(r"case-7-[0-9a-f]{8}", new_id)
    assert all(v["status"] == "ok" for v in slides.values()) and len(slides) == 2
    assert [len(_samples(out, second, sid)) for sid in ("case-7", new_id)] == [4, 4]
    assert any("case 7.svs" in str(w.message) and new_id in str(w.message) for w in caught)
    both = tile_slides([spaced, dashed], out, cfg, progress=False)  # ids follow the source: nothing redone
    assert (both["last_run"]["ok"], both["last_run"]["skipped"]) == (0, 2) and both["slides"] == slides


@pytest.mark.filterwarnings("ignore::ssl_path.tiling.TilingWarning")
def test_concurrent_tilers_never_share_an_id(slides_dir: Path, tmp_path: Path) -> None:
    """Two tilers started at once on ``a/slide.svs`` and ``b/slide.svs`` (inputs that each look clash-free)
    into one output: ids are claimed under the manifest lock, so both slides land, with their own shards."""
    paths = _copies(slides_dir / CMU, tmp_path / "a" / "slide.svs", tmp_path / "b" / "slide.svs")
    out = tmp_path / "out"
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: tile_slides([p], out, _cfg(max_tiles_per_slide=4), progress=False), paths))
    manifest = json.loads((out / "manifest.json").read_text())
    slides = manifest["slides"]
    assert sorted(v["source"] for v in slides.values()) == [str(p) for p in paths]
    assert all(v["status"] == "ok" for v in slides.values())
    assert sorted(re.sub(r"[0-9a-f]{8}$", "<hash>", sid) for sid in slides) == ["slide", "slide-<hash>"]
    for sid, entry in slides.items():
        metas = [json.loads(s["json"]) for s in _samples(out, manifest, sid)]
        assert len(metas) == 4 and {(m["slide_id"], m["source"]) for m in metas} == {(sid, entry["source"])}


def test_claim_ids_follow_the_source_and_never_give_one_id_two_sources(tmp_path: Path) -> None:
    from ssl_path.tiling.inputs import path_id
    from ssl_path.tiling.pipeline import claim_ids

    a, b, c = (tmp_path / d / "s.svs" for d in "abc")
    recorded = {"s": {"source": str(a)}, "t": {"source": str(c)}}
    with pytest.warns(TilingWarning, match="belongs to"):  # a keeps its recorded id; b gives way
        assert claim_ids({path_id(a): a, "s": b, "u": c}, recorded) == {"s": a, path_id(b): b, "t": c}
    with pytest.warns(TilingWarning), pytest.raises(ValueError, match="would name both"):
        claim_ids({"s": b}, recorded | {path_id(b): {"source": str(c)}})
    with pytest.raises(ValueError, match="listed twice"):
        claim_ids({"x": b, "y": b}, {})
