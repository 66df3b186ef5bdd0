"""Checkpoints are trusted as data only, and never lost (issue 12, items 1, 2 and 6).

* A hostile checkpoint (a real training checkpoint plus an object whose unpickling runs
  ``touch <marker>``) handed to every entry point that reads one (train resume, ``ckpt_path``,
  ``model.backbone.pretrained_path``, ``ssl-path-eval`` and ``ssl-path-export`` with a file or a run
  dir) is refused through the real CLI: rc != 0, a message naming the file, the refused type and that
  ssl_path never unpickles code; the marker never appears.
* ``resume=false`` in a run dir that holds checkpoints is refused (nothing written); with
  ``overwrite=true`` the old checkpoints are moved aside, byte for byte, and a fresh run starts.
* A corrupt ``last.ckpt`` falls back to the newest intact ``step-N.ckpt`` with a warning naming both
  (the corrupt file is kept); no intact checkpoint at all is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ssl_path.cli.train import run
from ssl_path.config_validation import ConfigValidationError
from ssl_path.models.io import CorruptCheckpointError
from tests.helpers.processes import run_concurrently
from tests.train.runs import REPO, checkpoint_step, tiny_overrides, train_env

BIN = Path(sys.executable).parent
REFUSED = "ssl_path never unpickles code from a checkpoint"
UNSAFE_NAME = f"{os.system.__module__}.{os.system.__name__}"  # what torch reports: posix.system


class Payload:
    """Unpickling calls ``os.system("touch <marker>")``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cli(script: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / script), *args], cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=timeout
    )


def _args(tiled_root: Path) -> list[str]:
    return [*tiny_overrides(tiled_root), "data.num_workers=0"]


@pytest.fixture(scope="module")
def trained(smoke_eval_run: Path) -> Path:
    """4 steps of the tiny smoke run (the session's, tests/conftest.py): last.ckpt (step 4, hard link of
    step-4), step-2 and step-4. Read-only here: tests that write copy it first."""
    names = sorted(p.name for p in (smoke_eval_run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step-00000002.ckpt", "step-00000004.ckpt"]
    return smoke_eval_run


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)  # copies: the hard link last.ckpt == step-4 becomes two files
    return dst


def _compose(tiled_root: Path, run_dir: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[*_args(tiled_root), f"paths.output_dir={run_dir}", *overrides])


# --- item 1: no code from a checkpoint ever runs ----------------------------------------------------


@pytest.fixture
def hostile(hostile_file) -> tuple[Path, Path]:
    """The module's hostile file; a marker that a test's code left behind does not leak to the next."""
    yield hostile_file
    hostile_file[1].unlink(missing_ok=True)


@pytest.fixture(scope="module")
def hostile_file(trained, tmp_path_factory) -> tuple[Path, Path]:
    """``(hostile.ckpt, marker)``: the trained last.ckpt, intact, plus a Payload among its callback states."""
    tmp = tmp_path_factory.mktemp("hostile")
    marker = tmp / "marker"
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["callbacks"]["Payload"] = Payload(marker)
    torch.save(ckpt, tmp / "hostile.ckpt")
    # control: the full unpickler does run it (so "no marker" below means "refused", not "harmless")
    torch.load(tmp / "hostile.ckpt", map_location="cpu", weights_only=False)
    assert marker.exists()
    marker.unlink()
    return tmp / "hostile.ckpt", marker


ENTRIES = (
    "train resume",
    "train ckpt_path",
    "train pretrained_path",
    "eval file",
    "eval run dir",
    "export file",
    "export run dir",
)


def _entry_point(name: str, hostile_file: Path, tmp: Path, tiled_root: Path) -> tuple[str, list[str]]:
    """(console script, args) that make ``name`` read ``hostile_file``."""
    run_dir = tmp / "run"  # a run dir whose last.ckpt is the hostile file
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(hostile_file, run_dir / "checkpoints" / "last.ckpt")
    train = [*_args(tiled_root), "trainer.max_steps=1"]
    fresh = f"hydra.run.dir={tmp / 'fresh'}"
    return {
        "train resume": ("ssl-path-train", [*train, f"hydra.run.dir={run_dir}"]),
        "train ckpt_path": ("ssl-path-train", [*train, fresh, f"ckpt_path={hostile_file}"]),
        "train pretrained_path": (
            "ssl-path-train",
            [*train, fresh, f"model.backbone.pretrained_path={hostile_file}"],
        ),
        "eval file": ("ssl-path-eval", [f"checkpoint={hostile_file}", f"output={tmp / 'eval'}"]),
        "eval run dir": ("ssl-path-eval", [f"checkpoint={run_dir}", f"output={tmp / 'eval'}"]),
        "export file": ("ssl-path-export", [f"checkpoint={hostile_file}", f"output={tmp / 'export'}"]),
        "export run dir": ("ssl-path-export", [f"checkpoint={run_dir}", f"output={tmp / 'export'}"]),
    }[name]


@pytest.fixture(scope="module")
def refusals(
    trained, tiled_root, tmp_path_factory
) -> dict[str, tuple[subprocess.CompletedProcess, Path, Path]]:
    """Every entry point run at once on its own hostile file (its own Payload marker, so a marker names
    the entry point whose code ran): ``entry -> (process, hostile file, its tmp dir)``."""
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cmds, files = {}, {}
    for i, entry in enumerate(ENTRIES):
        tmp = tmp_path_factory.mktemp(f"entry{i}")
        ckpt["callbacks"]["Payload"] = Payload(tmp / "marker")
        torch.save(ckpt, tmp / "hostile.ckpt")
        script, args = _entry_point(entry, tmp / "hostile.ckpt", tmp, tiled_root)
        cmds[entry], files[entry] = [BIN / script, *args], (tmp / "hostile.ckpt", tmp)
    procs = run_concurrently(cmds, cwd=REPO, env=train_env(), timeout=400)
    return {entry: (procs[entry], *files[entry]) for entry in ENTRIES}


@pytest.mark.parametrize("entry", ENTRIES)
def test_hostile_checkpoint_is_refused_by_every_entry_point(entry, refusals):
    proc, hostile_file, tmp = refusals[entry]
    out = proc.stdout + proc.stderr
    assert not (tmp / "marker").exists(), f"{entry}: code from the checkpoint ran"
    assert proc.returncode != 0, out[-3000:]
    assert "UnsafeCheckpointError" in out and REFUSED in out, out[-3000:]
    assert UNSAFE_NAME in out and "is refused" in out, out[-3000:]
    read = hostile_file.name if "file" in entry or "_path" in entry else "last.ckpt"
    assert read in out, out[-3000:]  # the message names the file
    assert "weights_only=False" not in out  # torch's advice to load it in full is not passed on
    assert not (tmp / "export" / "model.safetensors").exists()


def test_a_pickle_named_safetensors_runs_nothing(hostile, tmp_path):
    """safetensors files hold no code; a pickle under that name fails in the safetensors parser."""
    from ssl_path.models import create_backbone

    hostile_file, marker = hostile
    fake = tmp_path / "model.safetensors"
    shutil.copy(hostile_file, fake)
    with pytest.raises(Exception, match=r"(?i)header|safetensor"):
        create_backbone("vit_tiny", pretrained_path=str(fake))
    assert not marker.exists()


# --- item 2: resume=false never writes into a run dir that holds checkpoints --------------------------


def test_resume_false_is_refused_and_overwrite_moves_the_old_checkpoints_aside(trained, tiled_root, tmp_path):
    run_dir = _copy_run(trained, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ckpts.iterdir()}

    proc = _cli("ssl-path-train", [*_args(tiled_root), "trainer.max_steps=2", "resume=false",
                                   f"hydra.run.dir={run_dir}"])  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert f"resume=false, but {ckpts} holds checkpoints (last.ckpt" in out, out[-3000:]
    assert "hydra.run.dir=<another dir>" in out and "overwrite=true" in out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ckpts.iterdir()} == before
    assert "starting fresh" not in out

    # overwrite=true: same run dir, fresh start; the old files moved aside unchanged, nothing deleted
    cfg = _compose(tiled_root, run_dir, ["trainer.max_steps=2", "resume=false", "overwrite=true"])
    assert run(cfg)["global_step"] == 2
    (old,) = run_dir.glob("checkpoints.old-*")
    assert {p.name: p.read_bytes() for p in old.iterdir()} == {k: v[0] for k, v in before.items()}
    assert checkpoint_step(ckpts / "last.ckpt") == 2 and checkpoint_step(old / "last.ckpt") == 4
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]  # smoke keeps no snapshots


def test_overwrite_needs_resume_false_and_stays_out_of_the_run_dir_name(tiled_root, tmp_path):
    cfg = _compose(tiled_root, tmp_path / "run", ["overwrite=true"])
    with pytest.raises(ConfigValidationError, match="overwrite=true: only with resume=false"):
        run(cfg)
    assert not (tmp_path / "run").exists()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        hydra_cfg = compose("train", return_hydra_config=True).hydra
    excluded = hydra_cfg.job.config.override_dirname.exclude_keys
    assert "overwrite" in excluded and "resume" in excluded  # resume=false overwrite=true: the same dir


# --- item 6: a corrupt last.ckpt falls back to the newest intact snapshot -------------------------------


def test_corrupt_last_ckpt_falls_back_to_the_newest_intact_snapshot(trained, tiled_root, tmp_path, caplog):
    run_dir = _copy_run(trained, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    last, step2, step4 = ckpts / "last.ckpt", ckpts / "step-00000002.ckpt", ckpts / "step-00000004.ckpt"
    truncated = last.read_bytes()[: last.stat().st_size // 2]
    last.write_bytes(truncated)  # torn
    step4.write_bytes(os.urandom(4096))  # garbage: the newest snapshot is not intact either
    cfg = _compose(tiled_root, run_dir, ["trainer.max_steps=3"])
    with caplog.at_level(logging.WARNING, logger="ssl_path.cli.train"):
        summary = run(cfg)
    assert summary["global_step"] == 3  # resumed at step 2 (else it would have run 3 fresh steps)
    warning = next(r.getMessage() for r in caplog.records if "cannot be resumed from" in r.getMessage())
    assert str(last) in warning and str(step2) in warning and "newest intact snapshot" in warning
    (kept,) = ckpts.glob("last.ckpt.corrupt-*")  # moved aside, not deleted
    assert kept.read_bytes() == truncated and str(kept) in warning
    assert checkpoint_step(last) == 3 and len(step4.read_bytes()) == 4096


def test_no_intact_checkpoint_is_refused_not_restarted(trained, tiled_root, tmp_path):
    run_dir = _copy_run(trained, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    for path in ckpts.iterdir():
        path.write_bytes(path.read_bytes()[:1000])
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    cfg = _compose(tiled_root, run_dir, ["trainer.max_steps=3"])
    with pytest.raises(CorruptCheckpointError) as err:
        run(cfg)
    msg = str(err.value)
    assert f"no intact checkpoint to resume from in {ckpts}" in msg and "last.ckpt" in msg
    assert "step-00000004.ckpt" in msg and "step-00000002.ckpt" in msg
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before
