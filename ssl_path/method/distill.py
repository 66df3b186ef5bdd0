"""Distillation of a finished run's teacher into a (smaller) student (DINOv2 §5; DINOv3's
``SSLMetaArch._setup_distillation`` in ``dinov3/train/ssl_meta_arch.py``).

``DistillModule`` is ``DINOv2Module`` with one change of target: the student learns the same DINO / iBOT
/ KoLeo objective, but on the centred outputs of a **frozen teacher** (``distill_teacher``: backbone, DINO
head and iBOT head) loaded from a finished run's checkpoint, instead of its own EMA. As in DINOv2 §5 (and
DINOv3's ``model_ema``), ``self.teacher`` stays the student's EMA: it is the final model, and what eval and
export read from the checkpoint (``teacher.backbone.*``).

* The frozen teacher comes from the ``teacher.*`` weights (the EMA teacher) of ``teacher_checkpoint`` (a
  Lightning checkpoint or a run dir -> ``checkpoints/last.ckpt``), read with ``load_checkpoint`` (weights
  only). Its backbone is rebuilt from the file's ``backbone_spec`` (``contracts.checkpoint_provenance``),
  its heads' sizes from the state-dict shapes; it may be larger than the student (other width / depth /
  heads) but must have the student's patch size and prototype counts (checked, the error names the key).
* It runs under ``no_grad``, in eval mode, in bf16 autocast on CUDA (``teacher_bf16``), never receives a
  gradient, is outside the optimiser and the EMA, and is one of ``inference_models()``: FSDP2 shards it
  like the EMA teacher and ``check_weights_finite`` checks it.
* Its weights are part of the state dict (``distill_teacher.*``; ``startswith("teacher.")`` never matches
  them, so eval / export / ``init_from`` see only the student's EMA under ``teacher.*``). A resume restores
  the teacher from the run's own checkpoint, not from ``teacher_checkpoint`` (which must still exist: the
  architecture is read from it), so the run continues bit-exactly even if that file was replaced by a
  later checkpoint of the teacher's run meanwhile (logged as a warning).
* ``student_masking=False`` (default; DINOv2 §5 "remove the masking", DINOv3 passes ``masks=None`` to the
  student when distilling): the student sees its global crops unmasked and the iBOT loss matches its patch
  tokens to the teacher's at the sampled mask positions (the data's masks then only choose the positions).
  The masks reach the student as all-False (``torch.where`` keeps every token bit for bit) so the mask token
  stays in the graph with a zero gradient, which DDP without ``find_unused_parameters`` needs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_path.contracts import (
    CKPT_BACKBONE_SPEC,
    CKPT_CONFIG,
    CKPT_STATE_DICT,
    checkpoint_provenance,
)
from ssl_path.method.init_from import InitFromError, resolve_init_path
from ssl_path.method.module import DINOv2Module, _head_out_dim, batch_mask_indices
from ssl_path.models import DINOHead, create_backbone
from ssl_path.models.io import _WRAPPER_INFIXES, load_checkpoint
from ssl_path.models.vit import TRAINING_ONLY_KWARGS

log = logging.getLogger(__name__)

__all__ = ["CKPT_DISTILL", "DistillError", "DistillModule", "load_distill_teacher", "resolve_teacher_path"]

SOURCE_PREFIX = "teacher."  # the finished run's EMA teacher in its state dict
PARTS = ("backbone", "dino_head", "ibot_head")
CKPT_DISTILL = "distill"  # {"teacher_checkpoint", "teacher_step"} in this module's checkpoints


class DistillError(ValueError):
    """``method.teacher_checkpoint`` names no usable teacher, or one that does not fit the student."""


def resolve_teacher_path(path: str | Path | None) -> Path:
    """A checkpoint file, or a run dir -> its ``checkpoints/last.ckpt``."""
    if path is None or str(path) in ("", "???"):
        raise DistillError(
            "method.teacher_checkpoint: not set; give the checkpoint (or run dir) of the finished run to "
            "distil from, e.g. method.teacher_checkpoint=runs/smoke/<run>"
        )
    try:
        return resolve_init_path(path)
    except InitFromError as err:
        raise DistillError(str(err).replace("init_from=", "method.teacher_checkpoint=", 1)) from err


def _strip_wrappers(key: str) -> str:
    for wrapper in _WRAPPER_INFIXES:  # torch.compile / activation checkpointing / FSDP1
        key = key.replace(wrapper, "")
    return key


def _head_from_state(state: Mapping[str, torch.Tensor], name: str, where: str, source: str) -> DINOHead:
    """A ``DINOHead`` sized from its weights: the MLP's linear layers, the bottleneck and the prototypes.

    ``freeze_prototype_norm`` is not recoverable from the shapes and does not matter: the prototype norms
    are loaded either way and a frozen teacher trains nothing."""
    prefix = f"{name}.mlp."
    layers = sorted(
        int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix) and k.endswith(".weight")
    )
    protos = state.get(f"{name}.last_layer.parametrizations.weight.original1")
    if not layers or protos is None:
        raise DistillError(f"{where}: no {source}{name}.* weights (a DINOHead) in its state_dict")
    first, last = state[f"{prefix}{layers[0]}.weight"], state[f"{prefix}{layers[-1]}.weight"]
    return DINOHead(
        in_dim=int(first.shape[1]),
        out_dim=int(protos.shape[0]),
        hidden_dim=int(first.shape[0]) if len(layers) > 1 else int(last.shape[0]),
        bottleneck_dim=int(last.shape[0]),
        nlayers=len(layers),
    )


def teacher_backbone_spec(ckpt: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The checkpoint's ``backbone_spec`` (or one derived from its saved config), training-only kwargs
    neutralised (no drop path, no ``pretrained_path`` to read)."""
    spec = ckpt.get(CKPT_BACKBONE_SPEC) or checkpoint_provenance(ckpt.get(CKPT_CONFIG)).get(
        CKPT_BACKBONE_SPEC
    )
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise DistillError(
            f"{where}: holds no {CKPT_BACKBONE_SPEC} (nor a saved config with model.backbone.name), so the "
            "teacher's architecture is unknown; distil from a checkpoint written by ssl-path-train"
        )
    return {**{k: v for k, v in spec.items() if not str(k).startswith("_")}, **TRAINING_ONLY_KWARGS}


def load_distill_teacher(
    path: str | Path, prefix: str = SOURCE_PREFIX
) -> tuple[nn.ModuleDict, dict[str, Any]]:
    """The frozen teacher ``{backbone, dino_head, ibot_head}`` of a finished run (its EMA teacher; another
    ``prefix``, e.g. ``"student."``, reads that model instead), in eval mode without gradients, and
    ``{"teacher_checkpoint", "teacher_step", "backbone_spec"}``.

    Built under a forked RNG: loading a teacher leaves the caller's random stream as it was."""
    file = resolve_teacher_path(path)
    where = f"method.teacher_checkpoint={path}"
    ckpt = load_checkpoint(file)
    state = ckpt.get(CKPT_STATE_DICT) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise DistillError(f"{where}: {file} is not a training checkpoint (no {CKPT_STATE_DICT})")
    source = {_strip_wrappers(k[len(prefix) :]): v for k, v in state.items() if k.startswith(prefix)}
    spec = teacher_backbone_spec(ckpt, where)
    with torch.random.fork_rng(devices=[]):
        model = nn.ModuleDict(
            {
                "backbone": create_backbone(**spec),
                "dino_head": _head_from_state(source, "dino_head", where, prefix),
                "ibot_head": _head_from_state(source, "ibot_head", where, prefix),
            }
        )
    target = model.state_dict()
    missing, unexpected = sorted(set(target) - set(source)), sorted(set(source) - set(target))
    wrong = [k for k in set(target) & set(source) if source[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        raise DistillError(
            f"{where}: its {prefix}* weights do not fit the architecture it records ({spec}): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, other shape {sorted(wrong)[:4]}"
        )
    model.load_state_dict(source, strict=True)
    model.requires_grad_(False)
    model.eval()
    info = {
        "teacher_checkpoint": str(file),
        "teacher_step": int(ckpt.get("global_step", -1)),
        "backbone_spec": spec,
    }
    return model, info


class DistillModule(DINOv2Module):
    """``DINOv2Module`` whose student learns a frozen teacher's targets; ``teacher`` is the student's EMA.

    Args (besides every ``DINOv2Module`` argument, passed through):
        teacher_checkpoint: a finished ssl-path-train run's checkpoint, or its run dir (``last.ckpt``);
            its EMA teacher (``teacher.*``: backbone and both heads) is the frozen teacher.
        teacher_bf16: run the frozen teacher in bf16 autocast on CUDA (no effect on CPU).
        student_masking: iBOT-mask the student's global crops as in pretraining; False (DINOv2 §5,
            DINOv3): the student sees them whole, the iBOT loss still at the sampled positions.
    """

    def __init__(
        self,
        *,
        teacher_checkpoint: str,
        teacher_bf16: bool = True,
        student_masking: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.teacher_bf16 = teacher_bf16
        self.student_masking = student_masking
        teacher, self.distill_info = load_distill_teacher(teacher_checkpoint)
        self._check_fits(teacher, f"method.teacher_checkpoint={teacher_checkpoint}")
        self.distill_teacher = teacher
        log.info(
            "distilling from %s (step %d, %s, embed dim %d) into a student of embed dim %d",
            self.distill_info["teacher_checkpoint"],
            self.distill_info["teacher_step"],
            self.distill_info["backbone_spec"].get("name"),
            teacher["backbone"].embed_dim,
            self.student["backbone"].embed_dim,
        )

    def _check_fits(self, teacher: nn.ModuleDict, where: str) -> None:
        """Same patch size and prototype counts as the student, else a ``DistillError`` naming the key."""
        t_patch, s_patch = teacher["backbone"].patch_size, self.student["backbone"].patch_size
        if t_patch != s_patch:
            raise DistillError(
                f"{where}: the teacher's patch size is {t_patch} (its backbone_spec), the student's "
                f"{s_patch} (model.backbone: its preset, or model.backbone.patch_size); distillation needs "
                "the same patch grid"
            )
        for head, key in (
            ("dino_head", "model.head.out_dim"),
            ("ibot_head", "model.head.out_dim, or method.ibot_head.out_dim"),
        ):
            k_t, k_s = _head_out_dim(teacher[head]), _head_out_dim(self.student[head])
            if k_t != k_s:
                raise DistillError(
                    f"{where}: the teacher's {head} has {k_t} prototypes, the student's {k_s} ({key}); "
                    f"distillation needs the same number: set {key.split(',')[0]}={k_t}"
                )

    # ------------------------------------------------------------------ the hooks of DINOv2Module
    def inference_models(self) -> dict[str, nn.ModuleDict]:
        models = super().inference_models()
        if "distill_teacher" in self._modules:  # absent only while __init__ runs
            models["distill_teacher"] = self.distill_teacher
        return models

    def target_model(self) -> nn.ModuleDict:
        """The frozen teacher: the student learns its centred outputs (the EMA ``teacher`` does not)."""
        return self.distill_teacher

    @torch.no_grad()
    def teacher_output(self, batch: dict[str, Any], teacher_temp: float) -> dict[str, torch.Tensor]:
        """``DINOv2Module.teacher_output`` of the frozen teacher, in bf16 autocast on CUDA if
        ``teacher_bf16`` (centring casts the logits to fp32 itself)."""
        use_bf16 = self.teacher_bf16 and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext():
            return super().teacher_output(batch, teacher_temp)

    def student_output(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Without ``student_masking`` the student gets all-False masks (its tokens unmasked, bit for bit)
        and keeps the batch's mask positions for the iBOT loss."""
        if not self.student_masking:
            indices = batch_mask_indices(batch)  # from the real masks: the positions the loss compares
            batch = {**batch, "masks": torch.zeros_like(batch["masks"]), "mask_indices": indices}
        return super().student_output(batch)

    def step_flops(self, batch: dict[str, Any]) -> float:
        """3x the student's forward, 1x the frozen teacher's (global crops only), per device step."""
        g = batch["global_crops"]
        size = tuple(g.shape[-2:])
        student_teacher = self.teacher["backbone"].flops_per_image(size) * g.shape[0]
        frozen = self.distill_teacher["backbone"].flops_per_image(size) * g.shape[0]
        return super().step_flops(batch) - student_teacher + frozen

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CKPT_DISTILL] = {
            "teacher_checkpoint": self.distill_info["teacher_checkpoint"],
            "teacher_step": self.distill_info["teacher_step"],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(CKPT_DISTILL) or {}
        if saved and saved.get("teacher_step") != self.distill_info["teacher_step"]:
            log.warning(
                "the distillation teacher was step %s of %s when this run started; %s now holds step %s. "
                "Continuing with the teacher saved in this run's checkpoint (distill_teacher.*)",
                saved.get("teacher_step"),
                saved.get("teacher_checkpoint"),
                self.distill_info["teacher_checkpoint"],
                self.distill_info["teacher_step"],
            )


def _inherit_signature(cls: type, base: type) -> None:
    """``inspect.signature(cls)`` and its ``__init__``'s type hints list ``base``'s parameters too (they
    pass through ``**kwargs``), so config validation checks every ``method.*`` key of a distill run as
    strictly as a dinov2 run's: unknown keys, missing required ones, types."""
    own = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    inherited = [
        p.replace(kind=p.KEYWORD_ONLY)
        for name, p in inspect.signature(base).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in {q.name for q in own}
    ]
    cls.__signature__ = inspect.Signature(inherited + own)  # type: ignore[attr-defined]
    hints = {**typing.get_type_hints(base.__init__), **typing.get_type_hints(cls.__init__)}
    cls.__init__.__annotations__ = {k: v for k, v in hints.items() if k != "kwargs"}


_inherit_signature(DistillModule, DINOv2Module)
