"""DINOv2 self-distillation as a LightningModule (Oquab et al. 2023, arXiv:2304.07193).

Reference implementation: facebookresearch/dinov2 ``dinov2/train/ssl_meta_arch.py`` (and the DINOv3
split into ``get_teacher_output`` / ``get_student_output`` / ``compute_losses``). Lightning owns the
loop; this module owns the student, the EMA teacher, the multi-crop forward and the losses:

* teacher (no grad, eval mode, no drop path) sees the ``n_g`` global crops; its CLS tokens go through
  the DINO head, its patch tokens *at the student's masked positions only* through the iBOT head;
  both are centred (Sinkhorn-Knopp or softmax with an EMA centre) at the scheduled temperature;
* student sees the global crops with iBOT masking and the ``n_l`` local crops without;
* loss = DINO CE (student crops vs the other teacher global crops) + iBOT masked-patch CE
  + KoLeo / KDE on the student's global CLS tokens;
* after each *optimiser* step (not micro-batch) ``teacher <- m teacher + (1 - m) student``;
* optionally (``gram``, DINOv3 §4) a Gram teacher, a frozen snapshot of the EMA teacher's backbone
  refreshed on a schedule, anchors the student's patch-similarity structure (``losses.gram_loss``).

Every scheduled value is recomputed from ``global_step`` (``schedules.Schedules.at``) at each step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from ssl_path import losses as L_
from ssl_path.contracts import CKPT_CONFIG, CKPT_NONFINITE, CKPT_RNG_STATES, checkpoint_provenance
from ssl_path.data.masking import mask_indices
from ssl_path.engine.health import PlateauMonitor, health_metrics
from ssl_path.engine.nonfinite import (
    NonFiniteGuard,
    NonFiniteWeightsError,
    apply_found_inf,
    clear_found_inf,
    nonfinite_tensors,
)
from ssl_path.engine.parallel import parallelize
from ssl_path.engine.rng import get_rng_state, set_rng_state
from ssl_path.engine.throughput import ThroughputMeter
from ssl_path.method.ema import ema_update
from ssl_path.method.gram import GramConfig, gram_active, gram_snapshot_at
from ssl_path.method.optim import OptimConfig, build_optimizer
from ssl_path.method.schedules import Schedules, ScheduleValues, scale_lr

log = logging.getLogger(__name__)

CENTERINGS = ("sinkhorn_knopp", "softmax")
# with trainer.log_every_n_steps=0 the non-finite counters are still read this often
NONFINITE_CHECK_WITHOUT_LOGGING = 50


class DINOv2Module(L.LightningModule):
    """Student + EMA teacher trained with DINO, iBOT and KoLeo/KDE losses.

    Args:
        backbone: factory ``(drop_path_rate=...) -> Backbone`` (``model.backbone``, a hydra partial of
            ``ssl_path.models.create_backbone``); called for the student and, with no drop path, the teacher.
        head: factory ``(in_dim) -> DINOHead`` (``model.head``), used for the DINO and iBOT heads.
        optim: optimiser and lr / weight-decay schedule settings (``configs/optim``).
        batch_size: per-device batch size (images before multi-crop); the global batch size
            ``batch_size * world_size * accumulate_grad_batches`` scales the lr.
        total_steps: schedule length in optimiser steps (normally ``trainer.max_steps``).
        dino_weight, ibot_weight, koleo_weight, kde_weight: loss weights (0 disables a term).
        kde_bandwidth: KDE kernel bandwidth.
        student_temp: student softmax temperature.
        teacher_temp_warmup, teacher_temp, teacher_temp_warmup_steps: teacher temperature warmup.
        momentum_teacher, momentum_teacher_end: EMA momentum, cosine from the first to the second.
        freeze_last_layer_steps: the prototype layers' lr is 0 for these first steps (DINOv2's
            ``last_layer_lr_schedule``: their gradients still move AdamW's moments and step count).
        centering: ``sinkhorn_knopp`` (DINOv2) or ``softmax`` (DINO's EMA centre).
        center_momentum: EMA momentum of the softmax centre.
        separate_ibot_head: a second head for iBOT (DINOv2 large configs) or the DINO head shared.
        gram: Gram anchoring (:class:`~ssl_path.method.gram.GramConfig`; None or weight 0: off). The
            Gram teacher is a backbone-only copy, in the state dict (so checkpoints and exact resume
            carry it) and sharded like the teacher under FSDP2.
        ibot_head: keyword arguments of ``head`` that differ for the separate iBOT head, e.g.
            ``{bottleneck_dim: 256}`` (DINOv2's ViT-L/g: DINO bottleneck 384, iBOT 256); None: the same.
        ibot_normalization: ``dinov2`` (the masked-patch CE summed with per-image weights and divided
            by all ``n_g * B`` global crops, as DINOv2) or ``masked_images`` (divided by the number of
            masked crops: with mask probability 0.5, twice the ``dinov2`` term); ``losses.ibot``.
        max_nonfinite_steps: consecutive non-finite steps (loss, gradient norm, or a non-finite lr /
            weight decay / momentum) tolerated (skipped and counted) before raising; the device-side
            counters are read on logging steps and at the end (engine/nonfinite.py). Non-finite
            student or teacher weights are never tolerated: a checkpoint of them is refused and the
            run ends with ``NonFiniteWeightsError`` instead of finishing.
        compile_blocks: ``torch.compile`` each transformer block in place (keeps state-dict keys).
        activation_checkpointing: recompute each student block in backward instead of keeping its
            activations (``torch.utils.checkpoint`` per block; ViT-L/H/g at large batches). The
            teacher runs without gradients and needs none.
        pack_crops: the student runs global and local crops as one packed token matrix (one launch
            per token-wise layer for both sizes; ``Backbone.forward_packed``) instead of two passes.
        compile_options: keyword arguments of ``nn.Module.compile`` for the blocks (e.g. ``mode``,
            ``backend``); ``dynamic`` defaults to False (one static graph per crop shape).
        seed: base seed; rank ``r`` draws drop-path noise from ``seed + r``.
        plateau_tolerance, plateau_after_steps: warn once (``log.warning``, rank 0) when, on a logging
            step ``>= plateau_after_steps``, the DINO loss is within ``plateau_tolerance`` nats of
            ``ln K`` (uniform collapse; ``engine/health.py``); tolerance 0 disables. Not checkpointed:
            a resumed run may warn once more. The ``health/*`` metrics are logged either way.
    """

    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        head: Callable[..., nn.Module],
        optim: OptimConfig,
        batch_size: int,
        total_steps: int,
        dino_weight: float = 1.0,
        ibot_weight: float = 1.0,
        koleo_weight: float = 0.1,
        kde_weight: float = 0.0,
        kde_bandwidth: float = 0.5,
        student_temp: float = 0.1,
        teacher_temp_warmup: float = 0.04,
        teacher_temp: float = 0.07,
        teacher_temp_warmup_steps: int = 37500,
        momentum_teacher: float = 0.992,
        momentum_teacher_end: float = 1.0,
        freeze_last_layer_steps: int = 1250,
        centering: str = "sinkhorn_knopp",
        center_momentum: float = 0.9,
        separate_ibot_head: bool = True,
        ibot_head: dict[str, Any] | None = None,
        ibot_normalization: str = "dinov2",
        gram: GramConfig | None = None,
        max_nonfinite_steps: int = 3,
        compile_blocks: bool = False,
        compile_options: dict[str, Any] | None = None,
        pack_crops: bool = True,
        activation_checkpointing: bool = False,
        seed: int = 0,
        plateau_tolerance: float = 0.02,
        plateau_after_steps: int = 200,
    ) -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        if ibot_normalization not in L_.IBOT_NORMALIZATIONS:
            raise ValueError(
                f"ibot_normalization must be one of {L_.IBOT_NORMALIZATIONS}, got {ibot_normalization!r}"
            )
        self.ibot_normalization = ibot_normalization
        self.optim = optim
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.gram = gram if gram is not None else GramConfig()
        self.weights = {
            "dino": dino_weight,
            "ibot": ibot_weight,
            "koleo": koleo_weight,
            "kde": kde_weight,
            "gram": self.gram.weight,
        }
        self.kde_bandwidth = kde_bandwidth
        self.student_temp = student_temp
        self.teacher_schedule = dict(
            teacher_temp_warmup=teacher_temp_warmup,
            teacher_temp=teacher_temp,
            teacher_temp_warmup_steps=teacher_temp_warmup_steps,
            momentum=momentum_teacher,
            momentum_end=momentum_teacher_end,
            freeze_last_layer_steps=freeze_last_layer_steps,
        )
        self.centering = centering
        self.center_momentum = center_momentum
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.compile_blocks = compile_blocks
        self.compile_options = {"dynamic": False, **dict(compile_options or {})}
        self.pack_crops = pack_crops
        self.activation_checkpointing = activation_checkpointing
        self.seed = seed
        self.plateau = PlateauMonitor(plateau_tolerance, plateau_after_steps)
        if ibot_head and not separate_ibot_head:
            raise ValueError(
                "method.ibot_head configures the separate iBOT head: set separate_ibot_head=true"
            )
        ibot_kwargs = dict(ibot_head or {})
        self.student = self._build_model(backbone, head, separate_ibot_head, None, ibot_kwargs)
        self.teacher = self._build_model(backbone, head, separate_ibot_head, 0.0, ibot_kwargs)
        self.teacher.load_state_dict(self.student.state_dict())
        if activation_checkpointing:
            self.student["backbone"].vit.set_grad_checkpointing(True)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if self.gram.enabled:  # a backbone like the teacher's; loaded from it at gram.start_step
            self.gram_teacher = nn.ModuleDict({"backbone": backbone(drop_path_rate=0.0)})
            self.gram_teacher.load_state_dict(self.teacher.state_dict(), strict=False)
            self.gram_teacher.requires_grad_(False)
            self.gram_teacher.eval()
        if centering == "softmax":
            self.dino_center = L_.SoftmaxCenter(_head_out_dim(self.student["dino_head"]))
            self.ibot_center = L_.SoftmaxCenter(_head_out_dim(self.student["ibot_head"]))
        self.schedules: Schedules | None = None  # needs the world size: built in setup()
        self.run_config: dict | None = None  # the resolved run config, stored in checkpoints
        self._pending_rng: dict | None = None
        self._throughput = ThroughputMeter()  # images/s and MFU between logging steps
        self._logging_step = False
        self._stepped = False  # set by optimizer_step, read by on_train_batch_end
        self._center_stats: dict[str, torch.Tensor] = {}  # softmax centring: this step's logit sums

    @staticmethod
    def _build_model(
        backbone, head, separate_ibot_head: bool, drop_path: float | None, ibot_kwargs: dict[str, Any]
    ) -> nn.ModuleDict:
        bb = backbone() if drop_path is None else backbone(drop_path_rate=drop_path)
        dino_head = head(in_dim=bb.embed_dim)
        ibot_head = head(in_dim=bb.embed_dim, **ibot_kwargs) if separate_ibot_head else dino_head
        return nn.ModuleDict({"backbone": bb, "dino_head": dino_head, "ibot_head": ibot_head})

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        world = self.trainer.world_size * self.trainer.accumulate_grad_batches
        self.set_global_batch_size(self.batch_size * world)

    def configure_model(self) -> None:
        """Compile blocks (``compile_blocks``) and, under ``ModelParallelStrategy``, shard with FSDP2."""
        mesh = self.device_mesh  # set by ModelParallelStrategy (configs/trainer/fsdp.yaml), else None
        if mesh is not None:
            dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names else mesh
            if dp_mesh.size() != mesh.size():
                raise ValueError("FSDP here is data-parallel only: set strategy.tensor_parallel_size=1")
            mesh = dp_mesh
        policy = getattr(self.trainer.strategy, "mp_policy", None) if mesh is not None else None
        options = self.compile_options if self.compile_blocks else None
        for model in (self.student, *self.inference_models().values()):
            parallelize(model, mesh, mp_policy=policy, compile_options=options)
        if mesh is not None:
            for name in ("dino_center", "ibot_center"):  # plain buffers outside the sharded modules
                if hasattr(self, name):
                    getattr(self, name).to(self.trainer.strategy.root_device)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # never trainer.estimated_stepping_batches here: it breaks dataloader state restore (Lightning #20550)
        # fused on CPU and CUDA: it takes the non-finite skip flag on the device (see engine/nonfinite.py)
        return build_optimizer(self.student, self.optim, use_fused=self.device.type in ("cpu", "cuda"))

    def train(self, mode: bool = True) -> DINOv2Module:
        """The teachers stay in eval mode whatever Lightning asks (no drop path, fixed norms)."""
        super().train(mode)
        for model in self.inference_models().values():
            model.eval()
        return self

    def inference_models(self) -> dict[str, nn.ModuleDict]:
        """The models that never train: the EMA teacher and, with Gram anchoring, the Gram teacher.
        Sharded like the student, kept in eval mode, checked for non-finite weights."""
        models = {"teacher": self.teacher}
        if self.gram.enabled:
            models["gram_teacher"] = self.gram_teacher
        return models

    def target_model(self) -> nn.ModuleDict:
        """The model whose centred outputs the student learns to predict: the EMA teacher."""
        return self.teacher

    # ------------------------------------------------------------------ forward pieces
    @torch.no_grad()
    def teacher_output(self, batch: dict[str, Any], teacher_temp: float) -> dict[str, torch.Tensor]:
        """Teacher targets: ``cls_probs`` (n_g, B, K), ``ibot_probs`` (M, K); raw logits for centring;
        the backbone's global-crop CLS tokens ``cls`` (n_g*B, D) for the health metrics."""
        crops = batch["global_crops"]  # (n_g*B, 3, G, G)
        n_g = int(batch["n_global_crops"])
        teacher = self.target_model()
        out = teacher["backbone"](crops)  # cls (n_g*B, D), patch (n_g*B, N, D)
        cls_logits = teacher["dino_head"](out["cls"])  # (n_g*B, K)
        ibot_logits = teacher["ibot_head"](_masked_tokens(out["patch"], batch))  # (M, K)
        if self.centering == "softmax":
            cls_probs = self.dino_center.apply(cls_logits, teacher_temp)
            ibot_probs = self.ibot_center.apply(ibot_logits, teacher_temp)
        else:
            cls_probs = L_.sinkhorn_knopp(cls_logits, teacher_temp)
            ibot_probs = L_.sinkhorn_knopp(ibot_logits, teacher_temp)
        return {
            "cls_probs": cls_probs.unflatten(0, (n_g, -1)),  # (n_g, B, K)
            "ibot_probs": ibot_probs,  # (M, K)
            "cls_logits": cls_logits,  # (n_g*B, K)
            "ibot_logits": ibot_logits,  # (M, K)
            "cls": out["cls"],  # (n_g*B, D)
        }

    def student_output(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Student: ``cls_logits`` (n_g + n_l, B, K), ``ibot_logits`` (M, K), ``global_cls`` (n_g*B, D)."""
        crops, masks = batch["global_crops"], batch["masks"]
        n_g, n_l = int(batch["n_global_crops"]), int(batch.get("n_local_crops", 0))
        backbone = self.student["backbone"]
        if n_l > 0 and self.pack_crops:
            g, loc = backbone.forward_packed([crops, batch["local_crops"]], [masks, None])
            cls_tokens = [g["cls"], loc["cls"]]  # (n_g*B, D), (n_l*B, D)
        else:
            g = backbone(crops, masks=masks)
            cls_tokens = [g["cls"]]  # (n_g*B, D)
            if n_l > 0:
                cls_tokens.append(backbone(batch["local_crops"])["cls"])  # (n_l*B, D)
        cls_logits = self.student["dino_head"](torch.cat(cls_tokens))  # ((n_g+n_l)*B, K)
        ibot_logits = self.student["ibot_head"](_masked_tokens(g["patch"], batch))  # (M, K)
        return {
            "cls_logits": cls_logits.unflatten(0, (n_g + n_l, -1)),
            "ibot_logits": ibot_logits,
            "global_cls": g["cls"],
            "global_patch": g["patch"],  # (n_g*B, N, D), the masked global crops' patch tokens
        }

    @torch.no_grad()
    def gram_teacher_patches(self, batch: dict[str, Any]) -> torch.Tensor:
        """The Gram teacher's patch tokens of the (unmasked) global crops on the student's grid,
        (n_g*B, N, D); computed at ``gram.teacher_crop_size`` and resized back when that is set."""
        crops = batch["global_crops"]  # (n_g*B, 3, G, G)
        size = self.gram.teacher_crop_size
        if size is not None and size != crops.shape[-1]:
            crops = torch.nn.functional.interpolate(
                crops, size=(size, size), mode="bicubic", align_corners=False, antialias=True
            )
        patches = self.gram_teacher["backbone"](crops)["patch"]
        grid = batch["global_crops"].shape[-1] // self.student["backbone"].patch_size
        return L_.resize_patch_grid(patches, grid, self.gram.resize_mode, self.gram.resize_antialias)

    @torch.no_grad()
    def snapshot_gram_teacher(self) -> None:
        """Gram teacher <- the EMA teacher's backbone (DINOv3 ``update_gram`` with m = 0: a copy)."""
        source = dict(self.teacher["backbone"].named_parameters())
        source.update(dict(self.teacher["backbone"].named_buffers()))
        for name, tensor in [
            *self.gram_teacher["backbone"].named_parameters(),
            *self.gram_teacher["backbone"].named_buffers(),
        ]:
            tensor.copy_(source[name])

    def compute_losses(
        self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Weighted loss terms and their sum ``total`` (all scalars)."""
        masks = batch["masks"]  # (n_g*B, N)
        n_g = int(batch["n_global_crops"])
        zero = student["cls_logits"].sum() * 0.0  # keeps every head in the graph (DDP)
        out: dict[str, torch.Tensor] = {}
        if self.weights["dino"] > 0:
            out["dino"] = L_.dino_loss(student["cls_logits"], teacher["cls_probs"], self.student_temp)
        if self.weights["ibot"] > 0:
            # each image weighs the same whatever its number of masked patches (DINOv2 masks_weight)
            weights = L_.ibot_mask_weights(masks, batch_mask_indices(batch))  # (M,)
            out["ibot"] = L_.ibot_patch_loss(
                student["ibot_logits"],
                teacher["ibot_probs"],
                weights,
                self.student_temp,
                normalization=self.ibot_normalization,
                n_images=masks.shape[0],  # n_g * B global crops, masked or not
            )
        if self.weights["koleo"] > 0:
            out["koleo"] = sum(L_.koleo_loss(c) for c in student["global_cls"].chunk(n_g))
        if self.weights["kde"] > 0:
            out["kde"] = sum(L_.kde_loss(c, self.kde_bandwidth) for c in student["global_cls"].chunk(n_g))
        if "gram_patches" in teacher:  # only from gram.start_step on (see _forward_losses)
            out["gram"] = L_.gram_loss(
                student["global_patch"],
                teacher["gram_patches"],
                normalize=self.gram.normalize,
                img_level=self.gram.img_level,
                remove_neg=self.gram.remove_neg,
            )
        total = zero
        for name, value in out.items():
            total = total + self.weights[name] * value
        out["total"] = total
        return out

    # ------------------------------------------------------------------ the step
    # Written once, driven by Lightning's hooks (training_step, configure_gradient_clipping,
    # optimizer_step) and by manual_step: _forward_losses (schedule, forward, losses) -> _observe (guard,
    # centre pool) -> backward -> _clip_and_flag (clip, found_inf) -> optimizer.step -> _finish_step (EMA).
    def schedule_at(self, step: int) -> ScheduleValues:
        if self.schedules is None:
            raise RuntimeError(
                "schedules are built in setup(); without a Trainer call set_global_batch_size()"
            )
        return self.schedules.at(step)

    def set_global_batch_size(self, global_batch_size: int) -> None:
        """Build the schedules (peak lr scaled to the global batch); ``setup`` does this under a Trainer."""
        self.schedules = build_schedules(
            self.optim, self.teacher_schedule, global_batch_size, self.total_steps
        )

    def apply_optimizer_schedule(self, optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
        """Write the scheduled lr and weight decay into every param group (times its multipliers); the
        prototype layers take ``last_layer_lr`` (0 while frozen), as DINOv2's ``apply_optim_scheduler``.

        The non-finite guard sees the values written (host floats, no sync): a non-finite one skips the
        step like a non-finite loss, before the update could turn the weights into NaN."""
        for group in optimizer.param_groups:
            lr = values.last_layer_lr if group["is_last_layer"] else values.lr
            group["lr"] = lr * group["lr_mult"]
            group["weight_decay"] = values.weight_decay * group["wd_mult"]
        self.nonfinite.observe_update(dataclasses.asdict(values), optimizer)

    def _forward_losses(
        self, batch: dict[str, Any], optimizer: torch.optim.Optimizer, step: int
    ) -> tuple[ScheduleValues, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Schedule at ``step`` (into ``optimizer``), teacher and student forward, the loss terms."""
        values = self.schedule_at(step)
        self.apply_optimizer_schedule(optimizer, values)
        if gram_snapshot_at(self.gram, step):  # before this step's forward; idempotent under accumulation
            self.snapshot_gram_teacher()
        teacher = self.teacher_output(batch, values.teacher_temp)
        if gram_active(self.gram, step):
            teacher["gram_patches"] = self.gram_teacher_patches(batch)
        student = self.student_output(batch)
        return values, teacher, student, self.compute_losses(student, teacher, batch)

    def _observe(self, losses: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> None:
        """No host sync: a non-finite loss sets the guard's device flag (backward still runs, on every
        rank); softmax centring pools the teacher-logit sums, applied once per step in ``_finish_step``."""
        self.nonfinite.observe(losses)
        if self.centering != "softmax":
            return
        for name, logits in (("dino_center", teacher["cls_logits"]), ("ibot_center", teacher["ibot_logits"])):
            stats = getattr(self, name).batch_stats(logits)
            pending = self._center_stats.get(name)
            self._center_stats[name] = stats if pending is None else pending + stats

    def _clip_and_flag(self, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Clip, then hand the step's device skip flag to the optimiser; ``(grad_norm, found_inf)``."""
        norm = self.clip_gradients_(optimizer)
        found_inf = self.nonfinite.found_inf(norm)
        apply_found_inf(optimizer, found_inf)
        return norm, found_inf

    def clip_gradients_(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Clip to ``optim.clip_grad`` (0 = none); returns the global gradient norm before clipping.

        ``optim.clip_grad_per_module`` (DINOv2's ``for v in model.student.values(): v.clip_grad_norm_``):
        the backbone, the DINO head and the iBOT head (once, when shared) are clipped separately, each
        to ``clip_grad``; the returned norm is ``sqrt(sum_i norm_i ** 2)``, the global norm, for logging
        and the non-finite guard. Otherwise one global norm is clipped. No host sync either way; under
        FSDP2 the norms are DTensors, made whole with ``full_tensor()`` (an all-reduce).
        """
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if self.optim.clip_grad_per_module:
            modules = list({id(m): m for m in self.student.values()}.values())
            chunks = [[p for p in m.parameters() if id(p) in in_optimizer] for m in modules]
        else:
            chunks = [[p for g in optimizer.param_groups for p in g["params"]]]
        max_norm = self.optim.clip_grad if self.optim.clip_grad > 0 else float("inf")
        norms = []
        for params in chunks:
            params = [p for p in params if p.grad is not None]
            if params:
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
                norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if len(norms) <= 1:
            return norms[0] if norms else None
        return torch.linalg.vector_norm(torch.stack(norms))

    def _finish_step(self, optimizer: torch.optim.Optimizer, momentum: float) -> None:
        """After ``optimizer.step()``: drop the flag; EMA teacher and softmax centres (both left as they
        were where the flag is set); the guard's counters take the step."""
        clear_found_inf(optimizer)
        skip = self.nonfinite.step_found_inf  # None when no clipping hook ran (then nothing was found)
        ema_update(self.teacher, self.student, momentum, skip=skip)
        for name, stats in self._center_stats.items():
            getattr(self, name).update_from_stats(stats, self.center_momentum, skip=skip)
        self._center_stats = {}
        self.nonfinite.end_step()

    @property
    def nonfinite_total(self) -> int:
        """Optimiser steps skipped for a non-finite loss, gradient or update value (a device read)."""
        return self.nonfinite.total

    @property
    def nonfinite_in_a_row(self) -> int:
        return self.nonfinite.in_a_row

    # ------------------------------------------------------------------ the step under Lightning
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        values, teacher, student, losses = self._forward_losses(batch, optimizer, self.global_step)
        self._observe(losses, teacher)
        self._logging_step = self._logs_this_step()
        if self._logging_step:
            self._log_step(losses, values, batch, teacher, student)
        return losses["total"]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip to ``optim.clip_grad`` ourselves (works with fused AdamW under bf16) and log the norm."""
        if problem := unsupported_trainer_setting(gradient_clip_val=gradient_clip_val):
            raise ValueError(problem)
        norm, _ = self._clip_and_flag(optimizer)
        if norm is not None and self._logging_step:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning calls this once per optimiser step (after accumulation): the EMA goes here."""
        step = self.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._finish_step(optimizer, self.schedule_at(step).momentum)
        self._stepped = True

    # ------------------------------------------------------------------ the step without a Trainer
    def manual_step(
        self,
        batch: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        step: int,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """One full training step without a Trainer (benchmarks): the pieces Lightning's hooks call,
        with the backward and the optimiser step Lightning would run, and no accumulation.

        Schedules at ``step`` (the prototype layers' lr is 0 while frozen) -> teacher/student forward
        (under autocast if given) -> backward -> clip -> optimiser step -> EMA. Returns the detached loss
        terms, ``grad_norm`` and the device skip flag ``skipped``.
        """
        with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            values, teacher, student, losses = self._forward_losses(batch, optimizer, step)
        # outside autocast: bf16 centre sums here, fp32 under Lightning (its autocast wraps training_step)
        self._observe(losses, teacher)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        grad_norm, found_inf = self._clip_and_flag(optimizer)
        optimizer.step()
        self._finish_step(optimizer, values.momentum)
        out = {k: v.detach() for k, v in losses.items()}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm.detach()
        out["skipped"] = found_inf
        return out

    # ------------------------------------------------------------------ logging
    def _log_step(
        self,
        losses: dict[str, torch.Tensor],
        values: ScheduleValues,
        batch: dict,
        teacher: dict[str, torch.Tensor],
        student: dict[str, torch.Tensor],
    ) -> None:
        metrics: dict[str, Any] = {f"loss/{k}": v.detach() for k, v in losses.items()}
        center = self.dino_center.center if self.centering == "softmax" else None
        health = health_metrics(teacher, student, self.student_temp, dino=losses.get("dino"), center=center)
        metrics.update(health)
        metrics.update(
            {
                "train/lr": values.lr,
                "train/weight_decay": values.weight_decay,
                "train/momentum": values.momentum,
                "train/teacher_temp": values.teacher_temp,
                "train/last_layer_lr": values.last_layer_lr,
                "train/nonfinite_steps": self.nonfinite.total_tensor(self.device),
                "train/masked_fraction": batch["masks"].float().mean(),
            }
        )
        for key, value in (batch.get("data_stats") or {}).items():
            if isinstance(value, int | float) or (torch.is_tensor(value) and value.numel() == 1):
                metrics[f"data/{key}"] = float(value)
        # no prog_bar metric: Lightning reads those at every batch end (engine/progress.py shows the loss)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=self.batch_size)
        if "dino" in losses:
            self._check_plateau(losses["dino"], health)

    def _check_plateau(self, dino: torch.Tensor, health: dict[str, torch.Tensor]) -> None:
        """Warn once if the DINO loss sits at ln K. Called on logging steps only; reads the device
        (one copy of three numbers) only while the monitor could still warn."""
        if not self.plateau.active(self.global_step):
            return
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        keys = ("health/log_k", "health/teacher_entropy", "health/teacher_max_prob", "health/prototypes_used")
        dino_loss, lk, entropy, max_prob, used = torch.stack(
            [dino.detach().float(), *(health[k] for k in keys)]
        ).tolist()
        message = self.plateau.update(
            self.global_step, dino_loss, lk, entropy, teacher_max_prob=max_prob, prototypes_used=used
        )
        if message is not None:
            log.warning(message)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self._pending_rng is not None:  # after a resume: as late as possible (see on_load_checkpoint)
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def _logs_this_step(self) -> bool:
        """Log (and so read device values) only on the steps Lightning writes to the logger,
        ``(step + 1) % log_every_n_steps == 0``, plus the first and the last step (for summaries).

        Lightning turns progress-bar metrics into Python numbers at every batch end and a logged
        float becomes a host-to-device copy, so logging every step would sync every step.
        """
        step, n = self.global_step, self.trainer.log_every_n_steps
        last = self.trainer.max_steps is not None and 0 < self.trainer.max_steps <= step + 1
        return (n > 0 and (step + 1) % n == 0) or step == 0 or last

    def on_train_batch_end(self, outputs, batch: dict[str, Any], batch_idx: int) -> None:
        stepped, self._stepped = self._stepped, False
        if not stepped:  # mid-accumulation: global_step has not moved yet
            return
        every = self.trainer.log_every_n_steps or NONFINITE_CHECK_WITHOUT_LOGGING
        if self._logging_step or self.global_step % every == 0:
            self.nonfinite.check(self.global_step)  # the only host read of the counters
        if not self._logging_step:
            return
        accumulate = self.trainer.accumulate_grad_batches
        rates = self._throughput.update(  # perf/images_per_s, perf/mfu since the last logging step
            self.global_step,
            self.device,
            images_per_step=self.batch_size * self.trainer.world_size * accumulate,
            flops_per_step=lambda: self.step_flops(batch) * accumulate,
            precision=self.trainer.precision,
        )
        if rates:
            self.log_dict(rates, on_step=True, on_epoch=False)

    def step_flops(self, batch: dict[str, Any]) -> float:
        """Training FLOPs of one step on this device: 3x forward for the student, 1x for the teacher
        (``Backbone.flops_per_image`` counts each crop size once and caches it)."""
        g, loc = batch["global_crops"], batch.get("local_crops")
        bb = self.teacher["backbone"]
        f_g = bb.flops_per_image(tuple(g.shape[-2:])) * g.shape[0]
        f_l = 0 if loc is None else bb.flops_per_image(tuple(loc.shape[-2:])) * loc.shape[0]
        return float(3 * (f_g + f_l) + f_g)

    # ------------------------------------------------------------------ checkpoint state
    def on_train_end(self) -> None:
        self.nonfinite.check(self.global_step)
        self.check_weights_finite("at the end of training")

    def check_weights_finite(self, when: str) -> None:
        """Raise ``NonFiniteWeightsError`` if a student or teacher tensor is non-finite on any rank.

        One host read (and, when distributed, one all-reduce: call on every rank), so only where the
        host waits for the device anyway: the end of training (a run with NaN weights must not count
        as finished) and every checkpoint save (it must not replace a good checkpoint)."""
        bad = nonfinite_tensors({"student": self.student, **self.inference_models()})
        if bad:
            raise NonFiniteWeightsError(
                f"{len(bad)} student/teacher tensor(s) hold non-finite values {when} (step "
                f"{self.global_step}), e.g. {', '.join(bad[:4])}; the run stops here without writing "
                "them. Resume from an earlier checkpoint, with a lower lr."
            )

    def on_train_start(self) -> None:
        # distinct drop-path noise per rank; the same on every restart (runs before the data iterator)
        if self.trainer.world_size > 1:
            torch.manual_seed(self.seed + self.trainer.global_rank)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_weights_finite("when saving a checkpoint")  # before anything is written
        states = [get_rng_state()]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, get_rng_state())
        checkpoint[CKPT_RNG_STATES] = states  # one per rank
        checkpoint[CKPT_NONFINITE] = self.nonfinite.state_dict()
        if self.run_config is not None:
            checkpoint[CKPT_CONFIG] = self.run_config
            # backbone_spec + normalization: eval and export rebuild the backbone from the file alone
            checkpoint.update(checkpoint_provenance(self.run_config))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(CKPT_RNG_STATES) or []
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if len(states) == self._world_size_or_one():
            self._pending_rng = states[rank]
        elif states:
            log.warning(
                "checkpoint has RNG states for %d ranks, this run has %d: not restoring them",
                len(states),
                self._world_size_or_one(),
            )
        self.nonfinite.load_state_dict(checkpoint.get(CKPT_NONFINITE, {}))

    def _world_size_or_one(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1


def unsupported_trainer_setting(gradient_clip_val: float | None = None, precision: Any = "32") -> str | None:
    """Why a Trainer setting cannot drive this module (``None`` if it can): one rule for the train app's
    config check and the module's own guard under a hand-built Trainer."""
    if gradient_clip_val is not None:
        return (
            f"trainer.gradient_clip_val: must stay null (got {gradient_clip_val}); clipping is "
            "optim.clip_grad, done by the module (so fused AdamW works with bf16)"
        )
    if str(precision) in ("16", "16-mixed", "16-true"):
        return (
            f"trainer.precision={precision}: fp16 needs a GradScaler, whose own skip flag and scaled "
            "gradients clash with the module's clipping and non-finite guard; use bf16-mixed or 32"
        )
    return None


def build_schedules(
    optim: OptimConfig, teacher: dict[str, Any], global_batch_size: int, total_steps: int
) -> Schedules:
    """All schedules of a run; the peak lr is ``optim.lr`` scaled to ``global_batch_size``."""
    return Schedules(
        lr=scale_lr(optim.lr, global_batch_size, optim.reference_batch_size, optim.lr_scaling),
        min_lr=optim.min_lr,
        warmup_steps=optim.warmup_steps,
        total_steps=total_steps,
        weight_decay=optim.weight_decay,
        weight_decay_end=optim.weight_decay_end,
        **teacher,
    )


def _head_out_dim(head: nn.Module) -> int:
    return head.last_layer.out_features  # DINOHead's prototype layer


def batch_mask_indices(batch: dict[str, Any]) -> torch.Tensor:
    """The batch's ``mask_indices`` (made by the data workers), else computed here (a host sync)."""
    indices = batch.get("mask_indices")
    if indices is None:
        indices = batch["mask_indices"] = mask_indices(batch["masks"])
    return indices


def _masked_tokens(patch: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """(n_g*B, N, D) patch tokens -> (M, D) at the masked positions, in ``masks.flatten()`` order.

    ``index_select`` (backward: ``index_add_``) needs no host sync. ``flatten`` copies the patch slice
    (it is not contiguous: the prefix tokens sit between images); integer advanced indexing would avoid
    that copy but its backward is a sorting ``index_put_``, not checked for syncs on a GPU yet."""
    return patch.flatten(0, 1).index_select(0, batch_mask_indices(batch))
