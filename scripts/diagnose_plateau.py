"""Short diagnostic runs for the ln K plateau (docs/learning.md, "controlled runs").

Trains with the real ``SSLDataModule`` and ``DINOv2Module.manual_step`` (no Trainer, no checkpoints) from
``configs/train.yaml`` plus hydra overrides, and prints one JSON line every 10 steps with the loss terms
and the signals that tell learning from the plateau: teacher target entropy (``t_ent``) and student
prediction entropy (``s_ent``) in nats, the student's and teacher's logit spread over the prototypes
(``s_spread``, ``t_spread``: std of the cosine logits, mean over crops), the number of prototypes that are
some teacher row's argmax (``used``) and the mean pairwise cosine of the teacher's CLS features
(``cos``). Every ``--every`` steps it prints a kNN balanced accuracy of the teacher's CLS features on a
labelled tile folder (stratified 4-fold x 3 seeds, neighbours capped at the smallest training class).

    python scripts/diagnose_plateau.py --steps 300 experiment=learn_cpu trainer.max_steps=1500 \
        data.root=runs/data/bundled_112 data.window=8 data.shards_per_chunk=2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from sklearn.model_selection import StratifiedKFold

from ssl_path import CONFIG_DIR
from ssl_path.cli.train import build_module
from ssl_path.eval.datasets import ImageDataset, load_tile_set
from ssl_path.eval.features import extract_features
from ssl_path.eval.probes import classification_metrics, knn_predict
from ssl_path.eval.transforms import eval_transform

DEFAULT_TILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiles" / "kather2016-100"


def knn_score(backbone: torch.nn.Module, dataset: ImageDataset, seeds=(0, 1, 2)) -> tuple[float, float]:
    """Mean and std over seeds of the pooled 4-fold kNN20 (k capped) balanced accuracy."""
    x, y = extract_features(backbone, dataset, batch_size=64, device=torch.device("cpu"), pooling="cls")
    scores = []
    for seed in seeds:
        pred = np.zeros_like(y)
        for tr, te in StratifiedKFold(n_splits=4, shuffle=True, random_state=seed).split(x, y):
            pred[te] = knn_predict(x[tr], y[tr], x[te], k=min(20, int(np.bincount(y[tr]).min())))
        scores.append(classification_metrics(y, pred)["balanced_accuracy"])
    return float(np.mean(scores)), float(np.std(scores))


@torch.no_grad()
def signals(module, batch: dict, teacher_temp: float) -> dict[str, float]:
    """Plateau signals of the current student and teacher on one batch."""
    t = module.teacher_output(batch, teacher_temp)
    s = module.student_output(batch)
    tp = t["cls_probs"].flatten(0, 1)
    sp = torch.softmax(s["cls_logits"].flatten(0, 1) / module.student_temp, -1)
    feats = torch.nn.functional.normalize(t["cls"], dim=-1)
    return {
        "t_ent": float(-(tp * tp.clamp_min(1e-30).log()).sum(-1).mean()),
        "s_ent": float(-(sp * sp.clamp_min(1e-30).log()).sum(-1).mean()),
        "s_spread": float(s["cls_logits"].flatten(0, 1).std(-1).mean()),
        "t_spread": float(t["cls_logits"].std(-1).mean()),
        "used": int(tp.argmax(-1).unique().numel()),
        "cos": float((feats @ feats.T).mean()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="hydra overrides of configs/train.yaml")
    parser.add_argument("--steps", type=int, default=300, help="steps to train")
    parser.add_argument("--every", type=int, default=300, help="kNN every this many steps")
    parser.add_argument("--tiles", type=Path, default=DEFAULT_TILES, help="labelled ImageFolder for kNN")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["logger=csv", *args.overrides])
    torch.manual_seed(cfg.seed)
    module = build_module(cfg)
    module.configure_model()
    module.batch_size = cfg.data.batch_size
    module.set_global_batch_size(cfg.data.batch_size)
    optimizer = module.configure_optimizers()
    data = instantiate(cfg.data)
    data.setup("fit")
    aug = cfg.data.augmentation
    tiles = load_tile_set(args.tiles)
    dataset = ImageDataset(
        tiles.paths, tiles.labels, eval_transform(aug.global_crop_size, 1.0, "bicubic", aug.mean, aug.std)
    )
    log_k = math.log(cfg.model.head.out_dim)
    print(
        json.dumps(
            {
                "overrides": args.overrides,
                "log_k": log_k,
                "knn_0": knn_score(module.teacher["backbone"], dataset),
            }
        )
    )
    start, stream = time.time(), iter(data.train_dataloader())
    for step in range(args.steps):
        batch = next(stream)
        batch.pop("_cursor", None)
        out = module.manual_step(batch, optimizer, step)
        if step % 10 == 9 or step == args.steps - 1:
            row = {"step": step + 1, **{k: round(float(v), 4) for k, v in out.items() if v.numel() == 1}}
            row.update(signals(module, batch, module.schedule_at(step).teacher_temp))
            row["sec"] = round(time.time() - start)
            print(json.dumps(row), flush=True)
        if (step + 1) % args.every == 0 or step == args.steps - 1:
            knn = knn_score(module.teacher["backbone"], dataset)
            print(json.dumps({"step": step + 1, "knn": knn, "lnK_minus_dino": log_k - float(out["dino"])}))


if __name__ == "__main__":
    main()
