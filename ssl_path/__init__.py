"""ssl_path: self-supervised pretraining of pathology foundation models."""

from pathlib import Path

__version__ = "0.1.0"

# The hydra configs: inside the package in a wheel install (pyproject maps the top-level configs/ to
# ssl_path/configs), else beside the package (source tree, editable install). Absolute, because a
# console script runs main() from module "ssl_path.<app>" and hydra would resolve a relative
# config_path as a python package "configs" instead of this directory.
_PACKAGE = Path(__file__).resolve().parent
CONFIG_DIR = str(_PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs")
