"""Slide metadata from the user (issue 18): the input CSV's mpp, magnification, slide_id, patient_id and
extra columns, their precedence over the slide's metadata, and rescuing failed slides in place."""

from __future__ import annotations

import csv
import hashlib
import json
import tarfile
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ssl_path.cli.tile import CONFIG_DIR, run
from ssl_path.contracts import dataset_id, read_manifest
from ssl_path.tiling import (
    SlideRecord,
    TilingConfig,
    TilingWarning,
    find_slide_records,
    find_slides,
    read_csv,
    record_ids,
    tile_slides,
)

CMU = "CMU-1-Small-Region.svs"
TCGA = "TCGA-CR-7395-01A-01-TS1.svs"  # no mpp and no objective power in its metadata
CMU_ID, TCGA_ID = "CMU-1-Small-Region", "TCGA-CR-7395-01A-01-TS1"
FAST = ["tiling.tile_size=64", "tiling.max_tiles_per_slide=4", "tiling.shard_max_count=2", "progress=false"]
FAST_CFG = TilingConfig(tile_size=64, max_tiles_per_slide=4, shard_max_count=2)  # what FAST composes


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="tile", overrides=overrides)


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def _tile_metas(out: Path, manifest: dict, slide_id: str) -> list[dict]:
    metas = []
    for shard in manifest["shards"]:
        if shard["slide_ids"] == [slide_id]:
            with tarfile.open(out / shard["path"]) as tar:
                metas += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    return metas


def _shard_stamps(out: Path, entry: dict) -> dict[str, tuple[int, str]]:
    files = [out / "shards" / s["path"] for s in entry["shards"]]
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def test_csv_mpp_tiles_the_tcga_slide_without_fallback(slides_dir: Path, tmp_path: Path) -> None:
    listing = _write_csv(
        tmp_path / "slides.csv",
        [
            ["Path", "MPP", "patient_id", "site"],
            [str(slides_dir / TCGA), "0.25", "TCGA-CR-7395", "colon"],
            [str(slides_dir / CMU), "", "CMU-1", "lung"],  # empty mpp: the slide's own metadata
        ],
    )
    out = tmp_path / "tiles"
    manifest = run(_compose([f"input={listing}", f"output={out}", *FAST]))
    assert manifest["config"]["fallback_mpp"] is None
    tcga, cmu = manifest["slides"][TCGA_ID], manifest["slides"][CMU_ID]
    assert tcga["status"] == "ok" and tcga["mpp_source"] == "csv" and tcga["mpp"] == 0.25
    assert tcga["tiles"] == 4 and tcga["per_mpp"]["0.5"]["level"] == 1 and tcga["warnings"] == []
    assert tcga["meta"] == {"patient_id": "TCGA-CR-7395", "site": "colon"}
    assert cmu["mpp_source"] == "metadata" and cmu["meta"] == {"patient_id": "CMU-1", "site": "lung"}
    metas = _tile_metas(out, manifest, TCGA_ID)
    assert len(metas) == 4
    for meta in metas:
        assert meta["mpp"] == 0.25 and meta["mpp_source"] == "csv"
        assert meta["meta"] == {"patient_id": "TCGA-CR-7395", "site": "colon"}
    assert {m["meta"]["site"] for m in _tile_metas(out, manifest, CMU_ID)} == {"lung"}


def test_failed_slide_rescued_in_place_by_csv_mpp(slides_dir: Path, tmp_path: Path) -> None:
    """Run 1 lacks TCGA's mpp (it fails, CMU is tiled); run 2 into the same output gives it: only TCGA is
    tiled, the config check lets it through, and CMU's entry and shard files are untouched."""
    out = tmp_path / "tiles"
    header = ["path", "mpp", "patient_id"]
    first_csv = _write_csv(
        tmp_path / "v1.csv", [header, [str(slides_dir / TCGA), "", "P1"], [str(slides_dir / CMU), "", "P2"]]
    )
    first = run(_compose([f"input={first_csv}", f"output={out}", *FAST]))
    assert first["last_run"] | {"seconds": 0} == {
        "ok": 1,
        "failed": 1,
        "skipped": 0,
        "tiles_written": 4,
        "seconds": 0,
    }
    assert first["slides"][TCGA_ID]["status"] == "failed" and "mpp" in first["slides"][TCGA_ID]["reason"]
    cmu_entry, stamps = first["slides"][CMU_ID], _shard_stamps(out, first["slides"][CMU_ID])
    second_csv = _write_csv(
        tmp_path / "v2.csv",
        [header, [str(slides_dir / TCGA), "0.25", "P1"], [str(slides_dir / CMU), "", "P2"]],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", TilingWarning)  # nothing to warn about: CMU's metadata is unchanged
        second = run(_compose([f"input={second_csv}", f"output={out}", *FAST]))
    assert second["last_run"] | {"seconds": 0} == {
        "ok": 1,
        "failed": 0,
        "skipped": 1,
        "tiles_written": 4,
        "seconds": 0,
    }
    tcga = second["slides"][TCGA_ID]
    assert tcga["status"] == "ok" and tcga["mpp_source"] == "csv" and tcga["meta"] == {"patient_id": "P1"}
    assert second["slides"][CMU_ID] == cmu_entry
    assert _shard_stamps(out, second["slides"][CMU_ID]) == stamps
    assert second["config"] == first["config"]
    on_disk = read_manifest(out)
    assert on_disk["dataset_id"] == dataset_id(on_disk) == second["dataset_id"] != first["dataset_id"]
    assert {s["slide_ids"][0] for s in on_disk["shards"]} == {CMU_ID, TCGA_ID}


def test_csv_wins_over_metadata_and_fallback(slides_dir: Path, tmp_path: Path) -> None:
    listing = _write_csv(
        tmp_path / "s.csv", [["path", "mpp", "magnification"], [str(slides_dir / CMU), "0.25", ""]]
    )
    cfg = TilingConfig(tile_size=64, max_tiles_per_slide=4, fallback_mpp=1.0)
    with pytest.warns(TilingWarning, match=r"CSV's 0.25 µm/px overrides 0.499 µm/px"):
        manifest = tile_slides(find_slide_records(listing), tmp_path / "a", cfg, progress=False)
    entry = manifest["slides"][CMU_ID]
    assert entry["mpp"] == 0.25 and entry["mpp_source"] == "csv" and entry["meta"] == {}
    metas = _tile_metas(tmp_path / "a", manifest, CMU_ID)  # 64 px at 0.5 µm/px = 128 level-0 px at 0.25
    assert len(metas) == 4 and all(m["mpp"] == 0.25 and m["extent"] == 128 and "meta" not in m for m in metas)
    # magnification alone: 10 / power µm/px, also recorded as csv
    by_power = _write_csv(tmp_path / "p.csv", [["path", "magnification"], [str(slides_dir / TCGA), "40x"]])
    with pytest.warns(TilingWarning, match="magnification 40x"):
        manifest = tile_slides(find_slide_records(by_power), tmp_path / "b", cfg, progress=False)
    assert manifest["slides"][TCGA_ID]["mpp"] == 0.25 and manifest["slides"][TCGA_ID]["mpp_source"] == "csv"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["path", "mpp"], ["a.svs", "0.5"], ["b.svs", "abc"]], r"s.csv row 3, column 'mpp': 'abc' is not"),
        ([["path", "mpp"], ["a.svs", "-0.5"]], r"row 2, column 'mpp': '-0.5' is not a positive number"),
        ([["path", "magnification"], ["a.svs", "forty"]], r"row 2, column 'magnification': 'forty'"),
        (
            [["path", "slide_id"], ["a.svs", "S1"], ["b.svs", "S1"]],
            r"row 3, column 'slide_id': 'S1' is already the slide_id of row 2",
        ),
        ([["path", "slide_id"], ["a.svs", "S 1/x"]], r"row 2, column 'slide_id': 'S 1/x' must match"),
        ([["file", "mpp"], ["a.svs", "0.5"]], r"\['mpp'\] but no path column"),
        ([["path", "mpp", "MPP"], ["a.svs", "0.5", "0.5"]], r"\['mpp'\] appear more than once"),
    ],
)
def test_bad_csv_values_name_row_and_column(tmp_path: Path, rows: list[list[str]], message: str) -> None:
    listing = _write_csv(tmp_path / "s.csv", rows)
    with pytest.raises(ValueError, match=message):
        read_csv(listing)


def test_bad_csv_stops_the_app_before_any_tiling(slides_dir: Path, tmp_path: Path) -> None:
    listing = _write_csv(
        tmp_path / "s.csv", [["path", "mpp"], [str(slides_dir / CMU), "0.5"], [str(slides_dir / TCGA), "n/a"]]
    )
    with pytest.raises(ValueError, match="row 3, column 'mpp'"):
        run(_compose([f"input={listing}", f"output={tmp_path / 'tiles'}", *FAST]))
    assert not (tmp_path / "tiles").exists()


def test_read_csv_records_and_plain_lists(slides_dir: Path, tmp_path: Path) -> None:
    listing = _write_csv(
        tmp_path / "s.csv",
        [
            ["slide_id", "Slide", "Magnification", "patient_id", "stain", ""],
            ["case-7", str(slides_dir / CMU), "20X", "P7", "HE", "ignored"],
            ["", "", "40", "P8", "HE", ""],  # no path: skipped
            ["", "rel/t.svs", "", "", "", ""],
        ],
    )
    a, b = read_csv(listing)
    assert a == SlideRecord(slides_dir / CMU, None, 20.0, "case-7", "P7", {"stain": "HE"})
    assert a.meta == {"patient_id": "P7", "stain": "HE"}
    assert b.path == tmp_path / "rel" / "t.svs" and b.slide_id is None and b.meta == {"stain": ""}
    plain = _write_csv(tmp_path / "plain.csv", [[str(slides_dir / CMU)], [str(slides_dir / TCGA)]])
    assert [r.has_metadata for r in read_csv(plain)] == [False, False]
    assert find_slides(plain) == sorted([slides_dir / CMU, slides_dir / TCGA])
    # the same slide from a path and a CSV: the CSV's record (with metadata) is the one kept
    one = _write_csv(tmp_path / "one.csv", [["path", "mpp"], [str(slides_dir / CMU), "0.5"]])
    (record,) = find_slide_records([str(slides_dir / CMU), one])
    assert record.mpp == 0.5
    two = _write_csv(tmp_path / "two.csv", [["path", "mpp"], [str(slides_dir / CMU), "0.4"]])
    with pytest.raises(ValueError, match="listed twice with different metadata"):
        find_slide_records([one, two])


def test_explicit_slide_ids(slides_dir: Path, tmp_path: Path) -> None:
    listing = _write_csv(
        tmp_path / "s.csv",
        [
            ["path", "slide_id", "mpp"],
            [str(slides_dir / CMU), "TCGA-CR-7395-01A-01-TS1", ""],
            [str(slides_dir / TCGA), "", "0.25"],
        ],
    )  # an explicit id equal to another slide's stem: that slide gets stem + hash instead
    ids = record_ids(find_slide_records(listing))
    assert ids[TCGA_ID].path == slides_dir / CMU
    (other,) = set(ids) - {TCGA_ID}
    assert other.startswith(f"{TCGA_ID}-") and ids[other].path == slides_dir / TCGA
    out = tmp_path / "tiles"
    manifest = run(_compose([f"input={listing}", f"output={out}", *FAST]))
    assert manifest["slides"][TCGA_ID]["source"] == str(slides_dir / CMU)
    assert {m["slide_id"] for m in _tile_metas(out, manifest, TCGA_ID)} == {TCGA_ID}
    # an explicit id that names another source in the output is refused, not silently renamed
    taken = _write_csv(tmp_path / "t.csv", [["path", "slide_id"], [str(tmp_path / "new.svs"), TCGA_ID]])
    with pytest.raises(ValueError, match=f"slide_id '{TCGA_ID}' given for .*new.svs already names .*CMU"):
        tile_slides(find_slide_records(taken), out, FAST_CFG, progress=False)
    # a source already in the output keeps its id; a new explicit one for it is not used (warned)
    renamed = _write_csv(
        tmp_path / "r.csv", [["path", "slide_id", "mpp"], [str(slides_dir / TCGA), "T7", "0.25"]]
    )
    with pytest.warns(
        TilingWarning, match=f"already in this output as '{other}'.*'T7' given for it is not used"
    ):
        again = tile_slides(find_slide_records(renamed), out, FAST_CFG, progress=False)
    assert "T7" not in again["slides"] and again["last_run"]["skipped"] == 1


def test_finished_slide_with_changed_metadata_is_kept_with_a_warning(
    slides_dir: Path, tmp_path: Path
) -> None:
    cfg = TilingConfig(tile_size=64, max_tiles_per_slide=4)
    out = tmp_path / "tiles"
    first = tile_slides([SlideRecord(slides_dir / CMU, patient_id="P1")], out, cfg, progress=False)
    stamps = _shard_stamps(out, first["slides"][CMU_ID])
    with pytest.warns(
        TilingWarning, match=r"1 slide\(s\) already tiled are kept.*mpp 0.499 \(metadata\) -> 0.3"
    ):
        again = tile_slides(
            [SlideRecord(slides_dir / CMU, mpp=0.3, patient_id="P1")], out, cfg, progress=False
        )
    assert again["last_run"]["skipped"] == 1 and again["slides"][CMU_ID] == first["slides"][CMU_ID]
    assert _shard_stamps(out, again["slides"][CMU_ID]) == stamps
    with warnings.catch_warnings():  # a plain path says nothing about metadata: no warning
        warnings.simplefilter("error", TilingWarning)
        tile_slides([slides_dir / CMU], out, cfg, progress=False)


def test_manifest_carries_its_dataset_id(slides_dir: Path, tmp_path: Path) -> None:
    cfg = TilingConfig(tile_size=64, max_tiles_per_slide=4, shard_max_count=2)
    manifest = tile_slides([slides_dir / CMU], tmp_path, cfg, progress=False)
    on_disk = read_manifest(tmp_path)
    assert on_disk["dataset_id"] == manifest["dataset_id"] == dataset_id(on_disk)
    assert len(on_disk["dataset_id"]) == 16
    again = tile_slides([slides_dir / CMU], tmp_path, cfg, progress=False)  # nothing new: same id
    assert again["dataset_id"] == manifest["dataset_id"] and again["last_run"]["skipped"] == 1
    # the same tiles made with another number of threads are the same dataset (threads: speed only)
    other = tile_slides([slides_dir / CMU], tmp_path / "threads1", replace(cfg, threads=1), progress=False)
    assert other["config"]["threads"] == 1 != on_disk["config"]["threads"]
    assert other["dataset_id"] == manifest["dataset_id"]
    bigger = tile_slides([slides_dir / CMU], tmp_path / "size", replace(cfg, tile_size=96), progress=False)
    assert bigger["dataset_id"] != manifest["dataset_id"]  # a field that changes the tiles does
