"""Gram anchoring settings and its refresh schedule (DINOv3 §4.2), as pure functions of the step.

The Gram teacher is a frozen copy of the EMA teacher's backbone: loaded at ``start_step`` (DINOv3
``gram.it_load_ema_teacher``), then replaced by a fresh copy every ``refresh_every`` steps, at most
``max_refreshes`` times (DINOv3 ``rep_update``, ``update_frequency``, ``max_updates``). The loss is on
from ``start_step``. Whether step ``s`` takes a snapshot depends on ``s`` alone, and the Gram teacher's
weights are part of the module's state dict, so a run resumed at any step continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GramConfig", "gram_active", "gram_snapshot_at", "gram_snapshot_steps"]


@dataclass(frozen=True)
class GramConfig:
    """``method.gram``: Gram anchoring (off while ``weight`` is 0).

    Args:
        weight: loss weight (DINOv3's ViT-7B anchoring stage ramps to 2.0; its high-res stage 1.5).
        start_step: the Gram teacher is loaded from the EMA teacher before this step's forward, and the
            loss counts from this step on.
        refresh_every: after ``start_step``, reload the Gram teacher from the EMA teacher every this many
            steps (0: never; DINOv3: 10,000).
        max_refreshes: at most this many reloads after the first (None: unbounded; DINOv3: 3).
        teacher_crop_size: the Gram teacher sees the global crops resized (bicubic) to this size and its
            patch features are resized back to the student's grid (DINOv3 ``gram_teacher_crops_size``:
            512 for 256 px crops); None: the student's crops as they are. Unlike DINOv3, which cuts a
            separate high-resolution, undistorted crop of the image, this upsamples the augmented crop.
        resize_mode, resize_antialias: how the teacher's patch grid is resized back (DINOv3: bicubic,
            no antialiasing).
        normalize, img_level, remove_neg: ``ssl_path.losses.gram_loss`` options (DINOv3: true, true, false).
    """

    weight: float = 0.0
    start_step: int = 0
    refresh_every: int = 0
    max_refreshes: int | None = None
    teacher_crop_size: int | None = None
    resize_mode: str = "bicubic"
    resize_antialias: bool = False
    normalize: bool = True
    img_level: bool = True
    remove_neg: bool = False

    def __post_init__(self) -> None:
        if self.weight < 0 or self.start_step < 0 or self.refresh_every < 0:
            raise ValueError("method.gram: weight, start_step and refresh_every must be >= 0")
        if self.max_refreshes is not None and self.max_refreshes < 0:
            raise ValueError("method.gram.max_refreshes must be >= 0 or null")
        if self.teacher_crop_size is not None and self.teacher_crop_size <= 0:
            raise ValueError("method.gram.teacher_crop_size must be > 0 or null")
        if self.resize_mode not in ("bicubic", "bilinear", "nearest", "area"):
            raise ValueError(
                f"method.gram.resize_mode {self.resize_mode!r}: bicubic, bilinear, nearest or area"
            )

    @property
    def enabled(self) -> bool:
        return self.weight > 0


def gram_active(cfg: GramConfig, step: int) -> bool:
    """Whether the Gram loss counts at ``step``."""
    return cfg.enabled and step >= cfg.start_step


def gram_snapshot_at(cfg: GramConfig, step: int) -> bool:
    """Whether the Gram teacher is (re)loaded from the EMA teacher before ``step``'s forward."""
    if not cfg.enabled or step < cfg.start_step:
        return False
    if step == cfg.start_step:
        return True
    if cfg.refresh_every <= 0:
        return False
    since, rem = divmod(step - cfg.start_step, cfg.refresh_every)
    return rem == 0 and (cfg.max_refreshes is None or since <= cfg.max_refreshes)


def gram_snapshot_steps(cfg: GramConfig, total_steps: int) -> list[int]:
    """Every step < ``total_steps`` that takes a snapshot (for logs and tests)."""
    if not cfg.enabled:
        return []
    first = [cfg.start_step] if cfg.start_step < total_steps else []
    if cfg.refresh_every <= 0:
        return first
    n = (total_steps - 1 - cfg.start_step) // cfg.refresh_every
    if cfg.max_refreshes is not None:
        n = min(n, cfg.max_refreshes)
    return first + [cfg.start_step + k * cfg.refresh_every for k in range(1, n + 1)]
