"""ssl_path: self-supervised pretraining of pathology foundation models."""

from pathlib import Path

__version__ = "0.1.0"

# The hydra configs beside the package (an editable install; see README). Absolute, because a console
# script runs main() from module "ssl_path.<app>" and hydra would resolve a relative config_path as a
# python package "configs" instead of this directory.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
