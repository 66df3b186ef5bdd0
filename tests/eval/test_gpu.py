"""Feature extraction on a GPU: bf16 autocast stays close to the fp32 CPU features."""

from __future__ import annotations

import numpy as np
import torch

from ssl_path.eval.datasets import ImageDataset, load_tile_set
from ssl_path.eval.features import extract_features
from ssl_path.eval.probes import knn_predict
from ssl_path.eval.transforms import eval_transform
from ssl_path.models import create_backbone
from tests.helpers.run_if import RunIf


@RunIf(min_gpus=1)
def test_bf16_cuda_features_match_fp32_cpu(kather_dir):
    tiles = load_tile_set(kather_dir)
    ds = ImageDataset(tiles.paths, tiles.labels, eval_transform(224))
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny").eval()
    cpu, y = extract_features(bb, ds, batch_size=50, device="cpu")
    gpu, y2 = extract_features(bb.cuda(), ds, batch_size=50, device="cuda", autocast_dtype=torch.bfloat16)
    assert gpu.dtype == np.float32 and np.array_equal(y, y2)
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cos.min() > 0.99
    # the probes see nearly the same neighbours: leave-half-out kNN predictions mostly agree
    a = knn_predict(cpu[::2], y[::2], cpu[1::2], k=10)
    b = knn_predict(gpu[::2], y[::2], gpu[1::2], k=10)
    assert (a == b).mean() >= 0.9
