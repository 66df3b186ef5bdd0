"""Run directory names (``ssl_path.cli.run_dir``) and the data check that runs before one exists.

* 20 long overrides and an absolute ``data.root``: one name of at most 120 characters, no path separator
  (the previous scheme's name would not fit a file name), and a real 2-step run resumes in the same dir
  after the data moved (``data.root`` enters as the dataset's content id, not its path).
* The same override set in any order: the same dir; another set: another dir; ``hydra.run.dir=`` wins;
  a sweep job's subdir is named the same way.
* A run dir named by the previous scheme that holds checkpoints keeps resuming (and says so).
* A bad ``data.root`` fails, saying what it found, before a run dir (or anything else) exists.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ssl_path.cli import run_dir as rd
from ssl_path.config_validation import ConfigValidationError
from ssl_path.contracts import MANIFEST_NAME, dataset_id, read_manifest
from tests.train.runs import checkpoint_step, tiny_overrides, train_env

# real keys with long names, values as the smoke experiment has them (the run is unchanged by them)
LONG = [
    "data.augmentation.global_crop_scale=[0.32,1.0]",
    "data.augmentation.local_crop_scale=[0.05,0.32]",
    "data.augmentation.hed_jitter_p=0.5",
    "data.augmentation.color_jitter_p=0.8",
    "data.augmentation.interpolation=bicubic",
    "data.augmentation.color_jitter_order=random",
    "data.augmentation.global_blur_p=[1.0,0.1]",
    "data.augmentation.blur_kernel_size=9",
    "data.augmentation.blur_sigma=[0.1,2.0]",
    "data.augmentation.hflip_p=0.5",
    "data.augmentation.vflip_p=0.5",
    "data.augmentation.grayscale_p=0.2",
    "data.augmentation.solarize_p=[0.0,0.2]",
    "data.mask_ratio_min_max=[0.1,0.5]",
    "data.mask_min_num_patches=4",
    "data.mask_max_num_patches_ratio=0.5",
]


def _long_overrides(data_root: Path, runs_dir: Path) -> list[str]:
    """tiny_overrides (5 that name the run, data.root included) + 16 long ones + where runs go."""
    return [*tiny_overrides(data_root), *LONG, f"paths.runs_dir={runs_dir}"]


def _hydra(compose_train, overrides: list[str]):
    return compose_train(overrides, hydra_cfg=True).hydra


def _run_dir(compose_train, overrides: list[str]) -> Path:
    return Path(_hydra(compose_train, overrides).run.dir)


def _copy_data(tiled_root: Path, dest: Path) -> Path:
    shutil.copytree(tiled_root, dest)
    return dest


def test_twenty_long_overrides_and_an_absolute_data_root_give_a_bounded_name(
    compose_train, tiled_root, tmp_path
):
    overrides = _long_overrides(tiled_root, tmp_path / "runs")
    hydra = _hydra(compose_train, overrides)
    run_dir = Path(hydra.run.dir)
    name = run_dir.name
    named = rd.identity_overrides(hydra.overrides.task, hydra.job.config.override_dirname.exclude_keys)
    assert len(named) >= 20
    assert run_dir.parent == tmp_path / "runs" / "smoke"
    assert len(name) <= rd.MAX_NAME and "/" not in name and "\\" not in name
    assert re.fullmatch(r"[A-Za-z0-9._+=,~-]+-[0-9a-f]{8}", name), name
    manifest = read_manifest(tiled_root)
    # readable: the dataset's id (not its path) first, then leaf keys and values in key order
    assert name.startswith(f"dataset={dataset_id(manifest)},blur_kernel_size=9,blur_sigma=0.1_2.0,"), name
    # the previous scheme: the data path's folders nested in the run dir, then one name over 255 bytes
    old = hydra.job.override_dirname
    assert f"data.root={tiled_root}" in old and max(len(part) for part in old.split("/")) > 255


def test_same_set_any_order_same_dir_other_set_other_dir(compose_train, tiled_root, tmp_path):
    overrides = _long_overrides(tiled_root, tmp_path / "runs")
    base = _run_dir(compose_train, overrides)
    assert _run_dir(compose_train, list(reversed(overrides))) == base
    # keys that only change how long or where it runs do not name the run
    assert _run_dir(compose_train, [*overrides, "trainer.max_steps=7", "data.num_workers=0"]) == base
    changed = [o.replace("hflip_p=0.5", "hflip_p=0.25") for o in overrides]
    assert _run_dir(compose_train, changed) != base
    # a value hidden from the readable part (truncated) still changes the hash
    assert (
        _run_dir(
            compose_train, [o.replace("mask_min_num_patches=4", "mask_min_num_patches=5") for o in overrides]
        )
        != base
    )
    assert _run_dir(compose_train, ["experiment=smoke"]).name == rd.EMPTY_NAME
    assert _run_dir(compose_train, ["experiment=smoke", "seed=1"]) != _run_dir(
        compose_train, ["experiment=smoke", "seed=2"]
    )
    # the same key twice: the last value counts, as in hydra
    assert _run_dir(compose_train, ["seed=1", "seed=2"]) == _run_dir(compose_train, ["seed=2"])


def test_data_enters_by_its_content_id_not_its_path(compose_train, tiled_root, tmp_path):
    moved = _copy_data(tiled_root, tmp_path / "elsewhere" / "deeper" / "tiles")
    here = _run_dir(compose_train, ["experiment=smoke", f"data.root={tiled_root}"])
    there = _run_dir(compose_train, ["experiment=smoke", f"data.root={moved}"])
    assert here == there
    # the tiler's stored id wins over the computed one; other tiles, another dir
    manifest = json.loads((moved / MANIFEST_NAME).read_text())
    (moved / MANIFEST_NAME).write_text(json.dumps({**manifest, "dataset_id": "0123456789abcdef"}))
    stored = _run_dir(compose_train, ["experiment=smoke", f"data.root={moved}"])
    assert "dataset=0123456789abcdef" in stored.name and stored != here
    # no readable manifest: a hash of the value (the data check then refuses the run)
    missing = _run_dir(compose_train, ["experiment=smoke", f"data.root={tmp_path / 'nope'}"])
    assert "dataset=path-" in missing.name and missing != here


def test_explicit_run_dir_wins_and_sweep_subdirs_are_named_alike(compose_train, tiled_root, tmp_path):
    overrides = _long_overrides(tiled_root, tmp_path / "runs")
    assert _run_dir(compose_train, [*overrides, f"hydra.run.dir={tmp_path / 'mine'}"]) == tmp_path / "mine"
    hydra = _hydra(compose_train, overrides)
    assert Path(hydra.sweep.dir) == tmp_path / "runs" / "smoke" / "multirun"
    assert hydra.sweep.subdir == Path(hydra.run.dir).name


def test_a_run_dir_of_the_previous_scheme_keeps_resuming(compose_train, tiled_root, tmp_path, caplog):
    runs = tmp_path / "runs"
    overrides = [
        "experiment=smoke",
        f"data.root={tiled_root}",
        "model.head.out_dim=128",
        f"paths.runs_dir={runs}",
    ]
    hydra = _hydra(compose_train, overrides)
    new = Path(hydra.run.dir)
    old = runs / "smoke" / hydra.job.override_dirname  # data.root=/... nested, as the old scheme made it
    assert old != new and not old.exists()
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    assert _run_dir(compose_train, overrides) == old  # resumes where its checkpoints are
    assert rd.legacy_resumes[str(old)] == new.name
    # the trainer says so (here resume=false then refuses the dir: it holds checkpoints)
    from ssl_path.cli.train import run

    cfg = compose_train([*overrides, f"paths.output_dir='{old}'", "resume=false"])
    with caplog.at_level(logging.WARNING, logger="ssl_path.cli.train"), pytest.raises(ConfigValidationError):
        run(cfg)
    assert any(
        "previous run-dir scheme" in r.getMessage() and new.name in r.getMessage() for r in caplog.records
    )
    # once the new dir holds checkpoints (the old one moved there), it is used
    (new / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.ckpt").rename(new / "checkpoints" / "last.ckpt")
    assert _run_dir(compose_train, overrides) == new
    # no override at all: the old scheme ran in runs/<experiment> itself
    (runs / "smoke" / "checkpoints").mkdir()
    (runs / "smoke" / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    assert _run_dir(compose_train, ["experiment=smoke", f"paths.runs_dir={runs}"]) == runs / "smoke"


# ------------------------------------------------------------------------------------------- data check


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def test_data_check_says_what_it_found(tiled_root, tmp_path):
    with pytest.raises(rd.DataRootError, match=r"does not exist \(the nearest existing folder, .*, holds"):
        rd.check_data_root(tmp_path / "a" / "b")
    parent = tmp_path / "parent"
    _copy_data(tiled_root, parent / "tiles")
    with pytest.raises(
        rd.DataRootError,
        match=r"holds no manifest.json; found 1 entry: tiles/; tiled datasets one level down",
    ):
        rd.check_data_root(parent)
    (tmp_path / "file").write_text("x")
    with pytest.raises(rd.DataRootError, match="is a file, not a folder"):
        rd.check_data_root(tmp_path / "file")
    broken = _copy_data(tiled_root, tmp_path / "broken")
    (broken / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(
        rd.DataRootError, match="cannot read its manifest.json: ManifestError: .*not valid JSON"
    ):
        rd.check_data_root(broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / MANIFEST_NAME).write_text(
        json.dumps({"shards": [], "slides": {"s": {"status": "failed", "tiles": 0}}})
    )
    with pytest.raises(rd.DataRootError, match=r"lists 0 shards \(0 tiles\) and 1 slides \(0 ok, 1 failed"):
        rd.check_data_root(empty)
    gone = _copy_data(tiled_root, tmp_path / "gone")
    shutil.rmtree(gone / "shards")
    with pytest.raises(rd.DataRootError, match="but the first, .* is missing"):
        rd.check_data_root(gone)
    usable = sum(1 for s in _manifest(tiled_root)["slides"].values() if s["status"] == "ok")
    with pytest.raises(
        rd.DataRootError, match=f"data.tier=50: tier asks for 50 slides; the manifest has {usable}"
    ):
        rd.check_data_root(tiled_root, tier=50)
    rd.check_data_root(tiled_root)  # a good one passes


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiled_root) -> Iterator[str]:
    """``python -m http.server`` on 127.0.0.1 serving a copy of the real dataset; yields its URL."""
    top = tmp_path_factory.mktemp("served")
    shutil.copytree(tiled_root, top / "data")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(top)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_remote_data_is_checked_and_names_the_same_run_as_local(compose_train, tiled_root, served):
    rd.check_data_root(f"{served}/data")
    with pytest.raises(rd.DataRootError, match=f"no manifest.json at {served}/elsewhere/manifest.json"):
        rd.check_data_root(f"{served}/elsewhere")
    local = _run_dir(compose_train, ["experiment=smoke", f"data.root={tiled_root}"])
    assert _run_dir(compose_train, ["experiment=smoke", f"data.root={served}/data"]) == local


def test_run_refuses_a_bad_data_root_before_creating_anything(compose_train, tmp_path):
    out = tmp_path / "run"
    cfg = compose_train(["experiment=smoke", f"paths.output_dir={out}", f"data.root={tmp_path / 'nope'}"])
    from ssl_path.cli.train import run

    with pytest.raises(rd.DataRootError, match="does not exist"):
        run(cfg)
    assert not out.exists()


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssl_path.cli.train", *args],
        cwd=cwd, env=train_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_cli_bad_data_root_fails_before_a_run_dir_exists(tmp_path):
    proc = _cli(
        ["experiment=smoke", f"data.root={tmp_path / 'nope'}", f"paths.root_dir={tmp_path}"], tmp_path
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"DataRootError: data.root={tmp_path / 'nope'}: {tmp_path / 'nope'} does not exist" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no run dir, no .hydra, no train.log


@pytest.mark.slow
def test_long_overrides_run_resumes_in_the_same_dir_after_the_data_moves(tiled_root, tmp_path):
    data = _copy_data(tiled_root, tmp_path / "data" / "v1")
    runs = tmp_path / "runs"
    first = _cli([*_long_overrides(data, runs), "trainer.max_steps=2"], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (run_dir,) = (runs / "smoke").iterdir()
    assert len(run_dir.name) <= rd.MAX_NAME and checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 2

    (tmp_path / "moved").mkdir()
    moved = data.rename(tmp_path / "moved" / "tiles")  # the data moves; the command names its new place
    second = _cli([*_long_overrides(moved, runs), "trainer.max_steps=4"], tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert [p.name for p in (runs / "smoke").iterdir()] == [run_dir.name]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in second.stdout + second.stderr
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 4
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
