"""A wheel install (``pip install .``, not ``-e``) carries its hydra configs and runs from any directory.

Builds the wheel offline from a copy of the sources, installs it into a fresh venv (the dependencies
are borrowed from this interpreter's site-packages through a ``.pth`` line, which does not run the
editable install's finder, so ``ssl_path`` is imported from the wheel), then runs every console
script's ``--help`` and a 2-step smoke run from a directory outside the repo.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers.processes import run_concurrently
from tests.test_console_scripts import SCRIPTS  # each console script and a key its --help prints

REPO = Path(__file__).resolve().parents[1]
# what the build reads: pyproject.toml, its readme, the package and the configs mapped into it
SOURCES = ("pyproject.toml", "README.md", "MANIFEST.in", "ssl_path", "configs")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PIP_DISABLE_PIP_VERSION_CHECK="1")
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "SLURM_JOB_ID", "SLURM_NTASKS"):
        env.pop(key, None)
    return env


def _run(cmd: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (no build/ or egg-info left in the repo)."""
    src, dist = tmp_path_factory.mktemp("wheel_src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    _ok(_run([*cmd, "-w", dist, src], cwd=src))
    (whl,) = dist.glob("ssl_path-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed and this interpreter's dependencies visible."""
    root = tmp_path_factory.mktemp("venv")
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root))
    python = root / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index"]
    _ok(_run([*pip, wheel], cwd=root))
    # after the install, so pip never sees (or touches) this interpreter's editable ssl_path
    purelib = _ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root))
    deps = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (Path(purelib.stdout.strip()) / "_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return root


def test_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "ssl_path").rglob("*.py")}
    configs = {f"ssl_path/{p.relative_to(REPO).as_posix()}" for p in (REPO / "configs").rglob("*.yaml")}
    assert configs and not configs - names, f"configs missing from the wheel: {sorted(configs - names)}"
    assert not modules - names, f"modules missing (add the package to pyproject): {sorted(modules - names)}"


@pytest.mark.slow
def test_wheel_install_runs_the_apps_outside_the_repo(venv, tiled_root, tmp_path):
    probe = "import ssl_path; print(ssl_path.__file__); print(ssl_path.CONFIG_DIR)"
    where, config_dir = _ok(_run([venv / "bin" / "python", "-c", probe], tmp_path)).stdout.split()
    assert Path(where).is_relative_to(venv) and Path(config_dir).is_relative_to(venv), (where, config_dir)
    helps = {script: [venv / "bin" / script, "--help"] for script in SCRIPTS}
    helps = run_concurrently(helps, cwd=tmp_path, env=_env(), timeout=240)
    for script, key in SCRIPTS.items():
        out = _ok(helps[script]).stdout
        assert "== Configuration groups ==" in out and key in out, (script, out[-2000:])
    run_dir = tmp_path / "run"
    smoke = [
        "experiment=smoke",
        f"data.root={tiled_root}",
        "data.batch_size=2",
        "data.num_workers=0",
        "model.head.out_dim=128",
        "model.head.hidden_dim=64",
        "model.head.bottleneck_dim=32",
        "logger=csv",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"hydra.run.dir={run_dir}",
    ]
    proc = _ok(_run([venv / "bin" / "ssl-path-train", *smoke], tmp_path, timeout=300))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file(), proc.stderr[-3000:]
