"""Training-health signals of a DINO step, and a warning for the ``ln K`` plateau.

Uniform collapse: the student predicts the uniform distribution over the ``K`` prototypes. Then the
DINO cross-entropy is exactly ``ln K`` whatever the teacher's targets, and a centred teacher that has
collapsed too gives targets of entropy ``~ln K`` with a max probability ``~1/K``. DINO (Caron et al.
2021, arXiv:2104.14294, "Avoiding collapse") names the two collapse modes (one dimension dominates;
uniform output) and tells them apart by the teacher's target entropy; DINOv2 (Oquab et al. 2023,
arXiv:2304.07193) keeps the same DINO term.

The second mode, collapse to one prototype, shows as a one-hot teacher (target entropy near 0, max
probability near 1) whose argmax is the same prototype for every image (``prototypes_used`` ~ 1/K).
Collapse of the features themselves shows in the effective rank of the teacher's CLS features
(RankMe, Garrido et al. 2023, arXiv:2210.02885: ``exp`` of the entropy of the normalised singular
values; 1 when all features lie on a line, ``min(N, D)`` when the spectrum is flat), in their std over
the batch, and in the KoLeo nearest-neighbour distance (0 when images share one feature).

The functions below take one step's tensors and return 0-dim tensors on their device, with no host
sync (no ``.item()``, no ``bool()`` of a tensor, no boolean indexing): the module logs them on
logging steps, where Lightning reads logged values anyway. ``PlateauMonitor`` works on host floats
and is only called on those steps.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "PlateauMonitor",
    "center_norm",
    "cls_std",
    "health_metrics",
    "log_k",
    "nn_distance",
    "prototypes_used",
    "rankme",
    "student_entropy",
    "teacher_entropy",
    "teacher_max_prob",
]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (R, K) float32 (entropies of bf16 probabilities are too coarse to read)."""
    return x.detach().flatten(0, -2).float()


def teacher_entropy(cls_probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy in nats of the teacher's centred CLS targets: ``ln K`` when uniform, 0 when one-hot.

    Args:
        cls_probs: (n_g, B, K) (any leading shape), rows summing to 1.
    Returns:
        0-dim float32 tensor.
    """
    p = _rows(cls_probs)  # (R, K)
    return -torch.special.xlogy(p, p).sum(-1).mean()  # xlogy: 0 log 0 = 0


def student_entropy(cls_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean entropy in nats of ``softmax(cls_logits / student_temp)`` over all student crops.

    Args:
        cls_logits: (n_g + n_l, B, K) (any leading shape).
        student_temp: the student softmax temperature of the loss.
    Returns:
        0-dim float32 tensor.
    """
    logp = torch.log_softmax(_rows(cls_logits) / student_temp, dim=-1)  # (R, K)
    return -(logp.exp() * logp).sum(-1).mean()


def teacher_max_prob(cls_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the largest teacher probability: ``1/K`` uniform, 1 one-hot. (n_g, B, K) -> ()."""
    return _rows(cls_probs).amax(-1).mean()


def prototypes_used(cls_probs: torch.Tensor) -> torch.Tensor:
    """Share of the ``K`` prototypes that are the argmax of at least one teacher row. (n_g, B, K) -> ().

    ``index_fill_`` on a (K,) vector: O(K + R) memory (a one-hot would be R x K), no host sync.
    """
    p = cls_probs.detach().flatten(0, -2)  # (R, K)
    winners = p.argmax(-1)  # (R,)
    used = torch.zeros(p.shape[-1], device=p.device, dtype=torch.float32)  # (K,)
    return used.index_fill_(0, winners, 1.0).mean()


def cls_std(cls: torch.Tensor) -> torch.Tensor:
    """Std over the rows (images and global crops) of CLS features, averaged over feature dims.

    Near 0 when every image maps to the same feature (collapse). Population std (``correction=0``),
    so a single row gives 0, not NaN.

    Args:
        cls: (n_g*B, D) teacher-backbone CLS tokens of the global crops.
    Returns:
        0-dim float32 tensor.
    """
    return cls.detach().float().std(dim=0, correction=0).mean()


def rankme(features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Effective rank of a feature matrix (RankMe, Garrido et al. 2023, Eq. 1).

    ``p_k = s_k / sum(s) + eps`` over the singular values ``s`` of the (N, D) matrix, and
    ``exp(-sum_k p_k log p_k)``: between 1 (rank one: every image's feature on one line) and
    ``min(N, D)`` (flat spectrum). Not centred, as the paper.

    Args:
        features: (N, D) features, e.g. the teacher's CLS tokens of the global crops.
        eps: added to each normalised singular value (the paper's 1e-7).
    Returns:
        0-dim float32 tensor; NaN when ``features`` hold a non-finite value (a skipped step: the SVD would
        raise, and the ``where`` keeps this free of host syncs).
    """
    x = features.detach().float()
    finite = torch.isfinite(x).all()
    s = torch.linalg.svdvals(torch.where(finite, x, torch.zeros_like(x)))  # (min(N, D),)
    p = s / s.sum().clamp_min(torch.finfo(torch.float32).tiny) + eps
    return torch.where(finite, torch.exp(-(p * p.log()).sum()), torch.full_like(s.sum(), float("nan")))


def nn_distance(features: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """Mean Euclidean distance from each L2-normalised row to its nearest other row, within each of
    ``chunks`` equal row blocks (KoLeo's neighbourhood: one global crop's batch). 0 when images share
    a feature; what KoLeo's ``-log`` pushes up. (N, D) -> ().
    """
    x = torch.nn.functional.normalize(features.detach().float(), dim=-1)
    out = []
    for block in x.chunk(chunks):
        d = torch.cdist(block, block)  # (b, b)
        d.fill_diagonal_(float("inf"))
        out.append(d.amin(dim=1))  # (b,)
    return torch.cat(out).mean()


def center_norm(center: torch.Tensor) -> torch.Tensor:
    """L2 norm of a softmax-centring centre (DINO's EMA of the teacher logits). (K,) or (1, K) -> ()."""
    return center.detach().float().norm()


def log_k(k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``ln K`` as a 0-dim float32 tensor made on ``device`` (a fill, not a host-to-device copy)."""
    return torch.full((), math.log(k), device=device, dtype=torch.float32)


def health_metrics(
    teacher: dict[str, torch.Tensor],
    student: dict[str, torch.Tensor],
    student_temp: float,
    dino: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All signals of one step, keyed ``health/*`` (0-dim tensors, no host sync).

    Args:
        teacher: ``DINOv2Module.teacher_output``: ``cls_probs`` (n_g, B, K), optionally ``cls`` (n_g*B, D).
        student: ``DINOv2Module.student_output``: ``cls_logits`` (n_g + n_l, B, K), optionally
            ``global_cls`` (n_g*B, D) for the KoLeo nearest-neighbour distance.
        student_temp: the student softmax temperature.
        dino: the step's DINO loss (unweighted); adds ``health/dino_gap = ln K - dino`` (0 on the plateau).
        center: the DINO softmax centre (softmax centring only): adds ``health/center_norm``.
    """
    probs = teacher["cls_probs"]
    lk = log_k(probs.shape[-1], probs.device)
    out = {
        "health/teacher_entropy": teacher_entropy(probs),
        "health/student_entropy": student_entropy(student["cls_logits"], student_temp),
        "health/teacher_max_prob": teacher_max_prob(probs),
        "health/prototypes_used": prototypes_used(probs),
        "health/log_k": lk,
    }
    # nats below ln K: 0 for a uniform output, ln K for a one-hot one
    out["health/teacher_entropy_gap"] = lk - out["health/teacher_entropy"]
    out["health/student_entropy_gap"] = lk - out["health/student_entropy"]
    if "cls" in teacher:
        out["health/cls_std"] = cls_std(teacher["cls"])
        out["health/rankme"] = rankme(teacher["cls"])
    if "global_cls" in student:
        out["health/koleo_nn_dist"] = nn_distance(student["global_cls"], chunks=probs.shape[0])
    if center is not None:
        out["health/center_norm"] = center_norm(center)
    if dino is not None:
        out["health/dino_gap"] = lk - dino.detach().float()
    return out


class PlateauMonitor:
    """Warns once per run and mode when the signals say collapse: to uniform, or to one prototype.

    ``update`` is called on logging steps with host floats. At a step ``>= after_steps``:

    * **uniform** (the ``ln K`` plateau): ``dino > log_k - tolerance``;
    * **one prototype**: the teacher's targets are nearly one-hot (mean max probability
      ``>= one_hot_prob``) and every row of the batch picks the same prototype (``prototypes_used * K
      < 1.5``): the student is taught one answer for every image.

    Each returns a message the first time it is seen, and ``None`` ever after. ``tolerance=0``
    disables both. The state is not checkpointed: a resumed run may warn once more.

    Args:
        tolerance: nats below ``ln K`` that still count as the plateau (0 disables).
        after_steps: optimiser steps before which the loss may sit at ``ln K`` (a fresh head starts
            near uniform).
        one_hot_prob: mean teacher max probability above which one shared argmax counts as collapse.
    """

    def __init__(self, tolerance: float = 0.02, after_steps: int = 200, one_hot_prob: float = 0.9) -> None:
        if tolerance < 0 or after_steps < 0:
            raise ValueError(f"tolerance and after_steps must be >= 0, got {tolerance}, {after_steps}")
        self.tolerance = tolerance
        self.after_steps = after_steps
        self.one_hot_prob = one_hot_prob
        self.fired = False  # uniform
        self.fired_one = False  # one prototype

    def active(self, step: int) -> bool:
        """Whether ``update`` at ``step`` could warn: callers skip reading device values otherwise."""
        return self.tolerance > 0 and not (self.fired and self.fired_one) and step >= self.after_steps

    def update(
        self,
        step: int,
        dino_loss: float,
        log_k: float,
        teacher_entropy: float | None = None,
        teacher_max_prob: float | None = None,
        prototypes_used: float | None = None,
    ) -> str | None:
        """The warning message the first time a collapse mode is seen, else ``None``."""
        if not self.active(step):
            return None
        messages = []
        if not self.fired and dino_loss > log_k - self.tolerance:  # NaN: no warning
            self.fired = True
            target = ""
            if teacher_entropy is not None:
                target = f"; the teacher's target entropy is {teacher_entropy:.2f} nats"
            messages.append(
                f"DINO loss {dino_loss:.4f} is within {self.tolerance:g} of ln K = {log_k:.4f} at step "
                f"{step}: the student predicts (nearly) uniformly over the prototypes, the ln K "
                f"plateau{target}. See docs/learning.md."
            )
        k = math.exp(log_k)
        if (
            not self.fired_one
            and teacher_max_prob is not None
            and prototypes_used is not None
            and teacher_max_prob >= self.one_hot_prob
            and prototypes_used * k < 1.5
        ):
            self.fired_one = True
            messages.append(
                f"collapse to one prototype at step {step}: every image's teacher target picks the same "
                f"prototype with mean probability {teacher_max_prob:.3f} (1 of {k:.0f} prototypes used in "
                "the batch). Check the centring (sinkhorn_knopp), the teacher temperature and the lr."
            )
        return " ".join(messages) or None
