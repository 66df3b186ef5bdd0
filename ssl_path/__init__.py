"""ssl_path: self-supervised pretraining of pathology foundation models."""

__version__ = "0.1.0"
