"""``slurm/tile_array.sbatch`` on the local SLURM cluster: a 2-task array tiles the bundled slides (one
of them corrupt) into one shared output whose manifest the data module reads."""

from __future__ import annotations

import json
import tarfile

import pytest

from tests.slurm.conftest import REPO, sbatch, wait_job_end

pytestmark = [pytest.mark.slurm]


def test_tile_array_shares_one_output(tmp_path, slurm_env, slides_dir):
    out = tmp_path / "tiles"
    script = str(REPO / "slurm" / "tile_array.sbatch")
    array = sbatch(
        [
            "--cpus-per-task=1",
            "--time=10",
            "--array=0-1",
            f"--output={tmp_path}/tile_%A_%a.out",
            script,
            str(slides_dir),
            str(out),
            "tiling=tcga",
            "tiling.max_tiles_per_slide=6",
            "tiling.shard_max_count=4",
        ],
        slurm_env,
    )
    infos = [
        wait_job_end(f"{array}_{k}", slurm_env, timeout=420, log=tmp_path / f"tile_{array}_{k}.out")
        for k in (0, 1)
    ]
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert [i["JobState"] for i in infos] == ["COMPLETED", "COMPLETED"], logs[-3000:]
    assert "task 0 of 2" in logs and "task 1 of 2" in logs

    # Both tasks wrote into one manifest: the 4 slides, split round-robin, the corrupt one failed.
    manifest = json.loads((out / "manifest.json").read_text())
    status = {k: v["status"] for k, v in manifest["slides"].items()}
    assert status == {
        "CMU-1-Small-Region": "ok",
        "CMU-1-Small-Region-pyramid": "ok",
        "TCGA-CR-7395-01A-01-TS1": "ok",
        "broken": "failed",
    }
    assert all(manifest["slides"][s]["tiles"] == 6 for s in status if status[s] == "ok")
    assert sum(s["num_samples"] for s in manifest["shards"]) == 18
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["path"]) as tar:  # real, readable WebDataset tars
            names = tar.getnames()
        assert len([n for n in names if n.endswith(".jpg")]) == shard["num_samples"]

    # Training reads it like a single tiler run's output.
    from ssl_path.data.manifest import load_manifest, select_slides

    assert len(select_slides(load_manifest(out), 1.0)) == 3
