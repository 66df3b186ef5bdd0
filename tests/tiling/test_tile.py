"""The ``ssl-path-tile`` hydra app: real config composition, the console script and its exit codes."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ssl_path.cli.tile import CONFIG_DIR, all_failed, run
from ssl_path.tiling import TilingConfig, find_slides

TILE_BIN = Path(sys.executable).with_name("ssl-path-tile")


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="tile", overrides=overrides)


def test_default_tiling_yaml_lists_every_config_field() -> None:
    cfg = _compose(["output=unused"])
    fields = set(TilingConfig.__dataclass_fields__)
    assert set(cfg.tiling) - {"_target_"} == fields
    assert TilingConfig(**{k: v for k, v in cfg.tiling.items() if k != "_target_"}) == TilingConfig()


@pytest.mark.parametrize("variant", ["multiscale", "tcga"])
def test_tiling_variants_compose(variant: str) -> None:
    cfg = _compose([f"tiling={variant}", "output=unused"])
    TilingConfig(**{k: v for k, v in cfg.tiling.items() if k != "_target_"})


def test_run_on_a_glob_with_overrides(slides_dir: Path, tmp_path: Path) -> None:
    cfg = _compose(
        [f"input={slides_dir}/CMU*.svs", f"output={tmp_path}", "tiling.tile_size=256", "progress=false"]
    )
    manifest = run(cfg)
    assert set(manifest["slides"]) == {"CMU-1-Small-Region"}
    assert manifest["config"]["tile_size"] == 256 and not all_failed(manifest)


def test_array_tasks_partition_the_slides_into_one_output(slides_dir: Path, tmp_path: Path) -> None:
    common = [f"input={slides_dir}/CMU*", f"output={tmp_path}", "progress=false", "num_tasks=2"]
    first = run(_compose([*common, "task_index=0"]))
    second = run(_compose([*common, "task_index=1"]))
    assert first["last_run"]["ok"] == second["last_run"]["ok"] == 1
    assert set(second["slides"]) == {"CMU-1-Small-Region", "CMU-1-Small-Region-pyramid"}
    with pytest.raises(ValueError, match="task_index"):
        run(_compose([*common, "task_index=2"]))


def test_array_tasks_tile_two_slides_of_one_name(slides_dir: Path, tmp_path: Path) -> None:
    """Issue 12: ``a/slide.svs`` and ``b/slide.svs`` split over a 2-task array: each is tiled under its
    own id (task 1 used to skip ``b`` as "already done" because ``a`` had taken the id ``slide``)."""
    sources = {}
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        sources[d] = shutil.copy(slides_dir / "CMU-1-Small-Region.svs", tmp_path / d / "slide.svs")
    out = tmp_path / "tiles"
    common = [f"input={tmp_path}/*/slide.svs", f"output={out}", "progress=false", "num_tasks=2"]
    common.append("tiling.max_tiles_per_slide=4")
    runs = [run(_compose([*common, f"task_index={k}"])) for k in (0, 1)]
    assert [(r["last_run"]["ok"], r["last_run"]["skipped"]) for r in runs] == [(1, 0), (1, 0)]
    slides = runs[1]["slides"]
    assert sorted(v["source"] for v in slides.values()) == [str(Path(p).resolve()) for p in sources.values()]
    assert all(v["status"] == "ok" and v["tiles"] == 4 for v in slides.values())
    metas = []
    for shard in runs[1]["shards"]:  # both slides' tiles are in the shards, each under its own id
        with tarfile.open(out / shard["path"]) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert Counter((m["slide_id"], m["source"]) for m in metas) == {
        (sid, v["source"]): 4 for sid, v in slides.items()
    }
    again = [run(_compose([*common, f"task_index={k}"]))["last_run"] for k in (0, 1)]
    assert [(r["ok"], r["skipped"]) for r in again] == [(0, 1), (0, 1)]  # and each task agrees on ids


def test_find_slides_from_folder_csv_and_glob(slides_dir: Path, tmp_path: Path) -> None:
    names = [p.name for p in find_slides(slides_dir)]
    assert sorted(names) == sorted(
        [
            "CMU-1-Small-Region.svs",
            "CMU-1-Small-Region-pyramid.tiff",
            "TCGA-CR-7395-01A-01-TS1.svs",
            "broken.svs",
        ]
    )
    local = tmp_path / "data"
    local.mkdir()
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", local / "a.svs")
    with (tmp_path / "list.csv").open("w", newline="") as f:
        csv.writer(f).writerows(
            [["case", "path"], ["1", "data/a.svs"], ["2", str(slides_dir / "broken.svs")]]
        )
    from_csv = find_slides(tmp_path / "list.csv")  # relative paths resolve against the CSV's folder
    assert {p.name for p in from_csv} == {"a.svs", "broken.svs"} and all(p.is_absolute() for p in from_csv)
    assert [p.name for p in find_slides(f"{slides_dir}/*.tiff")] == ["CMU-1-Small-Region-pyramid.tiff"]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        find_slides(tmp_path / "nothing-here")


def test_console_script_on_the_bundled_slides(slides_dir: Path, tmp_path: Path) -> None:
    """The documented CLI: broken.svs fails, the run still exits 0 with a summary; a re-run does no work."""
    out = tmp_path / "tiles"
    cmd = [
        str(TILE_BIN),
        f"input={slides_dir}",
        f"output={out}",
        "tiling=tcga",
        "workers=1",  # the process pool is tested in test_pipeline; spawning is slow on a busy CI box
        "progress=false",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "3 slide(s) ok, 1 failed, 0 skipped" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slides"]["broken"]["status"] == "failed"
    assert manifest["slides"]["TCGA-CR-7395-01A-01-TS1"]["mpp_source"] == "fallback"
    assert "fallback_mpp" in proc.stderr  # the warning reaches the user
    assert (out / "hydra" / "task-0" / ".hydra" / "config.yaml").is_file()  # provenance beside the tiles
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 slide(s) ok, 1 failed, 3 skipped" in again.stdout


def test_console_script_fails_when_every_slide_fails(slides_dir: Path, tmp_path: Path) -> None:
    cmd = [str(TILE_BIN), f"input={slides_dir / 'broken.svs'}", f"output={tmp_path}", "progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "0 slide(s) ok, 1 failed" in proc.stdout
