"""Frozen-feature evaluation (kNN, linear probe, colour-histogram baseline) and backbone export."""

from ssl_path.eval.backbone import load_backbone
from ssl_path.eval.callback import PeriodicEval
from ssl_path.eval.datasets import ImageDataset, Split, TileSet, load_tile_set, make_splits
from ssl_path.eval.export import export_backbone
from ssl_path.eval.features import extract_features, pool_tokens
from ssl_path.eval.histogram import colour_histogram
from ssl_path.eval.probes import classification_metrics, knn_predict, linear_probe_predict
from ssl_path.eval.protocol import IntervalConfig, ProbeConfig, evaluate_features, summarise
from ssl_path.eval.runner import FeatureConfig, SplitConfig, evaluate_tile_set, run_evaluation

__all__ = [
    "FeatureConfig",
    "PeriodicEval",
    "ImageDataset",
    "IntervalConfig",
    "ProbeConfig",
    "Split",
    "SplitConfig",
    "TileSet",
    "classification_metrics",
    "colour_histogram",
    "evaluate_features",
    "evaluate_tile_set",
    "export_backbone",
    "extract_features",
    "knn_predict",
    "linear_probe_predict",
    "load_backbone",
    "load_tile_set",
    "make_splits",
    "pool_tokens",
    "run_evaluation",
    "summarise",
]
