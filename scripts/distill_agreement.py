"""How well a distilled student's features agree with its teacher's, beside a random-init student's.

    python scripts/distill_agreement.py --teacher <teacher run dir or .ckpt> --student <distilled run dir
        or .ckpt> [--tiles ../shared/data/tiles/kather2016-100] [--size 64] [--seeds 0 1 2]

Both models are read the way ``stage=distill`` reads a teacher (``ssl_path.method.distill.
load_distill_teacher``: a checkpoint's ``teacher.*`` backbone + DINO head, architecture from its
``backbone_spec``), so the student is the distilled run's EMA (its final model). The random students
have the student's architecture, freshly initialised with each seed. On held tiles (none of them seen in
training), resized to ``--size`` and normalised as the teacher was trained, three dimension-free measures
of the CLS features (teacher and student widths may differ):

* linear CKA (Kornblith et al. 2019) between the teacher's and the student's CLS features;
* 10-NN overlap: the mean share of each tile's 10 nearest neighbours (cosine) that teacher and student
  have in common;
* held-out DINO loss: the distillation objective's DINO term on these tiles, the cross-entropy of the
  student's prototype distribution (softmax at the run's ``student_temp``) against the teacher's
  Sinkhorn-Knopp-centred targets (at its ``teacher_temp``), over all tiles at once; ``ln K`` = a uniform
  prediction;
* top-1 prototype agreement: how often the argmax of the student's DINO head is the teacher's.

Prints a Markdown table (the one in docs/distill.md).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_path import losses as L_  # noqa: E402
from ssl_path.eval.backbone import checkpoint_file, normalisation_from_checkpoint  # noqa: E402
from ssl_path.eval.datasets import ImageDataset, load_tile_set  # noqa: E402
from ssl_path.eval.transforms import eval_transform  # noqa: E402
from ssl_path.method.distill import load_distill_teacher  # noqa: E402
from ssl_path.models import DINOHead, create_backbone  # noqa: E402
from ssl_path.models.io import load_checkpoint  # noqa: E402


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of (N, D1) and (N, D2) features: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def knn_overlap(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """Mean |NN_k(x_i) ∩ NN_k(y_i)| / k over the rows, cosine neighbours, self excluded."""

    def neighbours(f: torch.Tensor) -> torch.Tensor:
        f = nn.functional.normalize(f.double(), dim=-1)
        sim = f @ f.T
        sim.fill_diagonal_(-2.0)
        return sim.topk(k, dim=-1).indices

    nx, ny = neighbours(x), neighbours(y)
    common = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nx, ny, strict=True)]
    return sum(common) / (k * len(common))


def random_like(model: nn.ModuleDict, spec: dict, seed: int) -> nn.ModuleDict:
    """A freshly initialised model of ``model``'s architecture (backbone from ``spec``, DINO head sizes)."""
    head = model["dino_head"]
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    torch.manual_seed(seed)
    backbone = create_backbone(**spec)
    dino_head = DINOHead(
        in_dim=linears[0].in_features,
        out_dim=head.last_layer.out_features,
        hidden_dim=linears[0].out_features,
        bottleneck_dim=linears[-1].out_features,
        nlayers=len(linears),
    )
    return nn.ModuleDict({"backbone": backbone, "dino_head": dino_head}).eval()


@torch.no_grad()
def features(model: nn.ModuleDict, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS features (N, D) and DINO-head logits (N, K)."""
    cls = torch.cat([model["backbone"](x)["cls"] for x in images.split(32)])
    return cls, model["dino_head"](cls)


@torch.no_grad()  # scoped: the tests call main() in-process, a global switch would leak into later tests
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", required=True, help="the teacher run (dir or .ckpt)")
    parser.add_argument("--student", required=True, help="the distilled run (dir or .ckpt)")
    parser.add_argument("--tiles", default=str(REPO.parent / "shared" / "data" / "tiles" / "kather2016-100"))
    parser.add_argument("--size", type=int, default=64, help="tile side fed to the models (the smoke crop)")
    parser.add_argument(
        "--part",
        default="teacher",
        choices=["teacher", "student"],
        help="of the distilled run: its EMA (teacher, the final model) or the raw student",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random-init students")
    args = parser.parse_args(argv)

    teacher, t_info = load_distill_teacher(args.teacher)
    student, s_info = load_distill_teacher(args.student, prefix=f"{args.part}.")
    norm = normalisation_from_checkpoint(load_checkpoint(checkpoint_file(args.teacher), mmap=True))
    method = (load_checkpoint(checkpoint_file(args.student), mmap=True).get("config") or {}).get("method", {})
    t_temp, s_temp = float(method.get("teacher_temp", 0.07)), float(method.get("student_temp", 0.1))
    mean, std = norm if norm is not None else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    tiles = load_tile_set(args.tiles)
    data = ImageDataset(tiles.paths, tiles.labels, eval_transform(args.size, mean=mean, std=std))
    images = torch.stack([data[i][0] for i in range(len(data))])

    t_cls, t_logits = features(teacher, images)
    targets = L_.sinkhorn_knopp(t_logits, t_temp)  # (N, K), as the student's training targets
    rows = []
    candidates = [(f"distilled student ({'EMA' if args.part == 'teacher' else 'raw'})", student)]
    candidates += [
        (f"random-init student, seed {s}", random_like(student, s_info["backbone_spec"], s))
        for s in args.seeds
    ]
    for name, model in candidates:
        s_cls, s_logits = features(model, images)
        rows.append(
            {
                "student": name,
                "cka": linear_cka(t_cls, s_cls),
                "knn": knn_overlap(t_cls, s_cls),
                "dino": float(-(targets * torch.log_softmax(s_logits / s_temp, -1)).sum(-1).mean()),
                "top1": float((s_logits.argmax(-1) == t_logits.argmax(-1)).double().mean()),
            }
        )
    k = teacher["dino_head"].last_layer.out_features
    used = len(set(t_logits.argmax(-1).tolist()))

    def describe(model: nn.ModuleDict, info: dict) -> str:
        bb = model["backbone"]
        return (
            f"{info['teacher_checkpoint']} (step {info['teacher_step']}, width {bb.embed_dim}, "
            f"{len(bb.vit.blocks)} blocks)"
        )

    print(
        f"teacher: {describe(teacher, t_info)}; student: {describe(student, s_info)}; {len(images)} tiles "
        f"of {tiles.name} at {args.size} px; K = {k} prototypes (ln K = {math.log(k):.3f}), {used} used by "
        f"the teacher's argmax; teacher_temp {t_temp}, student_temp {s_temp}\n"
    )
    print("| student | linear CKA ↑ | 10-NN overlap ↑ | held-out DINO loss ↓ | top-1 prototype agreement ↑ |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['student']} | {r['cka']:.3f} | {r['knn']:.3f} | {r['dino']:.3f} | {r['top1']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
