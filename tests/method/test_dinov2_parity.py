"""``method=dinov2`` against facebookresearch/dinov2's objective and optimisation, on seeded toy inputs.

The reference below is written from dinov2's code (its formulas restated here, nothing imported from
ssl_path's losses, schedules or parameter groups):

* ``dinov2/train/ssl_meta_arch.py::forward_backward`` with ``dinov2/loss/dino_clstoken_loss.py``,
  ``ibot_patch_loss.py`` (``sinkhorn_knopp_teacher``, ``forward_masked``), ``koleo_loss.py`` and the
  ``masks_weight`` of ``dinov2/data/collate.py``;
* ``dinov2/utils/param_groups.py`` (``get_vit_lr_decay_rate``, ``get_params_groups_with_decay``);
* ``dinov2/train/train.py`` (``build_schedulers``, ``apply_optim_scheduler``, per-module ``clip_grad_norm_``)
  and ``dinov2/utils/utils.py::CosineScheduler``.

``pytest -s tests/method/test_dinov2_parity.py`` prints the one-step loss of both.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_path.data.synthetic import synthetic_batch
from ssl_path.method import OptimConfig
from ssl_path.method.module import build_schedules
from ssl_path.method.param_groups import param_groups
from ssl_path.models import DINOHead, create_backbone, list_backbones
from tests.method.tiny import tiny_module

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


# --------------------------------------------------------------------------- the reference objective
def ref_sinkhorn(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """DINOLoss / iBOTPatchLoss.sinkhorn_knopp_teacher on one process (B = rows, K = prototypes)."""
    q = torch.exp(logits.float() / temp).t()  # (K, B)
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def ref_dino_loss(student_list, teacher_list) -> torch.Tensor:
    """DINOLoss.forward: ``-sum_s sum_t mean_b sum_k t * log_softmax(s / T)``."""
    total = 0
    for s in student_list:
        lsm = F.log_softmax(s / STUDENT_TEMP, dim=-1)
        for t in teacher_list:
            total -= torch.sum(t * lsm, dim=-1).mean()
    return total


def ref_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeoLoss.forward: nearest neighbour by inner product, nn.PairwiseDistance(2, eps), log(d + eps)."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    nearest = dots.max(dim=1).indices
    distances = torch.linalg.vector_norm(x - x[nearest] + eps, dim=-1)  # PairwiseDistance adds eps
    return -torch.log(distances + eps).mean()


def ref_forward_masked(s, t, masks) -> torch.Tensor:
    """iBOTPatchLoss.forward_masked with collate's masks_weight = 1 / n_masked per image, / all images."""
    loss = torch.sum(t * F.log_softmax(s / STUDENT_TEMP, dim=-1), dim=-1)
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return -(loss * masks_weight).sum() / masks.shape[0]


def ref_losses(module, batch, separate_ibot_head: bool) -> dict[str, torch.Tensor]:
    """SSLMetaArch.forward_backward's loss_accumulator (n_global_crops = 2, weights 1 / 1 / 0.1)."""
    n_g, n_l = 2, int(batch["n_local_crops"])
    masks = batch["masks"]
    mask_indices_list = masks.flatten().nonzero().flatten()
    teacher, student = module.teacher, module.student
    with torch.no_grad():
        out = teacher["backbone"](batch["global_crops"])
        cls = out["cls"].chunk(n_g)
        cls = torch.cat((cls[1], cls[0]))  # reversed, so student crop A meets teacher crop B
        patches = out["patch"].flatten(0, 1).index_select(0, mask_indices_list)
        ibot_teacher_head = teacher["ibot_head"] if separate_ibot_head else teacher["dino_head"]
        t_logits = teacher["dino_head"](cls)
        t_dino = ref_sinkhorn(t_logits, TEACHER_TEMP).view(n_g, -1, *t_logits.shape[1:])  # (n_g, B, K)
        t_ibot = ref_sinkhorn(ibot_teacher_head(patches), TEACHER_TEMP)
    g = student["backbone"](batch["global_crops"], masks=masks)
    loc = student["backbone"](batch["local_crops"])
    s_local = student["dino_head"](loc["cls"])
    s_global = student["dino_head"](g["cls"])
    ibot_student_head = student["ibot_head"] if separate_ibot_head else student["dino_head"]
    s_ibot = ibot_student_head(g["patch"].flatten(0, 1).index_select(0, mask_indices_list))
    n_terms = (n_g - 1) * n_g + max(n_l * n_g, 1)
    dino_local = ref_dino_loss(s_local.chunk(n_l), t_dino) / n_terms
    loss_scales = 2
    dino_global = ref_dino_loss([s_global], [t_dino.flatten(0, 1)]) * loss_scales / n_terms
    koleo = 0.1 * sum(ref_koleo(p) for p in g["cls"].chunk(2))
    ibot = ref_forward_masked(s_ibot, t_ibot, masks) * loss_scales * (1.0 / n_g)
    return {
        "dino": dino_local + dino_global,
        "koleo": koleo,
        "ibot": ibot,
        "total": dino_local + dino_global + koleo + ibot,
    }


def _parity_batch(seed: int = 0) -> dict:
    """B = 4 images, 2 global 64 px and 2 local 32 px crops (p16): half the global crops masked, with
    different counts, shuffled over the crops (as dinov2's collate)."""
    batch = synthetic_batch(4, 2, 2, 64, 32, patch_size=16, mask_probability=0.0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(8, 16, dtype=torch.bool)
    for row, count in zip(torch.randperm(8, generator=g)[:4].tolist(), (2, 3, 5, 8), strict=True):
        masks[row, torch.randperm(16, generator=g)[:count]] = True
    batch["masks"], batch["mask_indices"] = masks, masks.flatten().nonzero().flatten()
    return batch


def _parity_module(**overrides):
    return tiny_module(backbone_kwargs={"img_size": 64, "drop_path_rate": 0.0, "reg_tokens": 4}, **overrides)


@pytest.mark.parametrize("separate_ibot_head", [True, False])
def test_one_step_total_loss_matches_dinov2(separate_ibot_head):
    """(a) DINO + iBOT + KoLeo of one step, same tiny module and batch: ssl_path vs the reference."""
    module = _parity_module(separate_ibot_head=separate_ibot_head)
    batch = _parity_batch()
    with torch.no_grad():
        ours = module.compute_losses(
            module.student_output(batch), module.teacher_output(batch, TEACHER_TEMP), batch
        )
        ref = ref_losses(module, batch, separate_ibot_head)
    print(
        f"\n[dinov2 parity, separate_ibot_head={separate_ibot_head}] one-step total loss: "
        f"ssl_path {ours['total'].item():.9f}  reference {ref['total'].item():.9f}  "
        f"|diff| {abs(ours['total'].item() - ref['total'].item()):.2e}"
    )
    for name in ("dino", "ibot"):
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(0.1 * ours["koleo"], ref["koleo"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours["total"], ref["total"], rtol=1e-6, atol=1e-6)


def test_ibot_normalisation_matches_dinov2_and_the_switch():
    """(b) ``ibot_normalization=dinov2`` is forward_masked x loss_scales / n_global_crops; the
    ``masked_images`` switch divides by the masked crops instead (here 4 of 8: twice as large)."""
    torch.manual_seed(0)
    masks = _parity_batch(seed=1)["masks"]  # (8, 16), 4 crops masked
    m = int(masks.sum())
    s, t = torch.randn(m, 32), torch.randn(m, 32).softmax(-1)
    expected = ref_forward_masked(s, t, masks) * 2 * (1.0 / 2)
    batch = {"masks": masks, "mask_indices": masks.flatten().nonzero().flatten(), "n_global_crops": 2}
    out = {"ibot_logits": s, "cls_logits": torch.zeros(2, 4, 32), "global_cls": torch.zeros(8, 4)}
    for normalization, factor in (("dinov2", 1.0), ("masked_images", 8 / 4)):
        module = _parity_module(ibot_normalization=normalization, dino_weight=0.0, koleo_weight=0.0)
        ibot = module.compute_losses(out, {"ibot_probs": t}, batch)["ibot"]
        torch.testing.assert_close(ibot, expected * factor, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="ibot_normalization"):
        _parity_module(ibot_normalization="tokens")


# --------------------------------------------------------------------------- parameter groups
def ref_lr_decay_rate(name: str, lr_decay_rate: float, num_layers: int, force_is_backbone: bool) -> float:
    """get_vit_lr_decay_rate (chunked_blocks=False)."""
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        if (  # noqa: SIM114
            ".pos_embed" in name
            or ".patch_embed" in name
            or ".mask_token" in name
            or ".cls_token" in name
            or ".register_tokens" in name
        ):
            layer_id = 0
        elif force_is_backbone and (
            "pos_embed" in name
            or "patch_embed" in name
            or "mask_token" in name
            or "cls_token" in name
            or "register_tokens" in name
        ):
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def ref_param_group(name: str, n_blocks: int, lr_decay_rate: float, patch_embed_lr_mult: float) -> tuple:
    """get_params_groups_with_decay for one (dinov2-named) parameter of one student module."""
    lr_mult = ref_lr_decay_rate(name, lr_decay_rate, n_blocks, force_is_backbone=n_blocks > 0)
    wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
    if "patch_embed" in name:
        lr_mult *= patch_embed_lr_mult
    return lr_mult, wd_mult, "last_layer" in name


def dinov2_name(module_name: str, name: str) -> str:
    """ssl_path (timm) parameter name inside a student module -> the DinoVisionTransformer / DINOHead name."""
    if module_name == "backbone":
        name = name.removeprefix("vit.").replace("reg_token", "register_tokens")
    return name.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"
    )


def _student(backbone: nn.Module, **head_kw) -> nn.ModuleDict:
    """As DINOv2Module._build_model builds the student (two separate heads)."""
    head = functools.partial(DINOHead, in_dim=backbone.embed_dim, **head_kw)
    return nn.ModuleDict({"backbone": backbone, "dino_head": head(), "ibot_head": head()})


def _check_groups_against_reference(student: nn.ModuleDict) -> int:
    groups = param_groups(student, lr=1.0, weight_decay=1.0, layer_decay=0.9, patch_embed_lr_mult=0.2)
    ours = {n: (g["lr_mult"], g["wd_mult"], g["is_last_layer"]) for g in groups for n in g["param_names"]}
    n_blocks = len(student["backbone"].vit.blocks)
    checked = 0
    for key, sub in student.items():
        for name, _ in sub.named_parameters():
            ref = ref_param_group(dinov2_name(key, name), n_blocks if key == "backbone" else 0, 0.9, 0.2)
            lr_mult, wd_mult, last = ours[f"{key}.{name}"]
            assert (wd_mult, last) == ref[1:], (key, name)
            assert lr_mult == pytest.approx(ref[0], rel=1e-12), (key, name)
            checked += 1
    return checked


def test_param_groups_match_dinov2_on_vit_s14_reg4():
    """(c) every parameter's lr / wd multiplier and last-layer flag, ViT-S/14 + 4 registers + 2 heads."""
    torch.manual_seed(0)
    student = _student(create_backbone("vit_s14", reg_tokens=4), out_dim=64, hidden_dim=32, bottleneck_dim=16)
    # the timm names map onto exactly DinoVisionTransformer(vit_small, num_register_tokens=4)'s names
    block = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma",
    ]  # fmt: skip
    dinov2_vits = {"cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight"}
    dinov2_vits |= {"patch_embed.proj.bias", "norm.weight", "norm.bias"}
    dinov2_vits |= {f"blocks.{i}.{n}" for i in range(12) for n in block}
    assert {dinov2_name("backbone", n) for n, _ in student["backbone"].named_parameters()} == dinov2_vits
    assert _check_groups_against_reference(student) == len(list(student.parameters()))


@pytest.mark.parametrize("name", [n for n in list_backbones() if n != "vit_s14"])
def test_param_groups_match_dinov2_on_every_preset(name):
    """The same rule on every preset (built on the meta device: names only)."""
    with torch.device("meta"):
        student = _student(create_backbone(name, reg_tokens=4), out_dim=64, hidden_dim=32, bottleneck_dim=16)
    assert _check_groups_against_reference(student) == len(list(student.parameters()))


# --------------------------------------------------------------------------- last-layer freeze
def test_frozen_last_layer_keeps_weights_but_adamw_moments_advance():
    """(d) DINOv2 freezes the prototype layer with lr 0: AdamW's moments and step count still advance
    on its gradients, the weights do not move; at the first unfrozen step AdamW has N steps behind it."""
    n_frozen = 2
    module = _parity_module(freeze_last_layer_steps=n_frozen, optim=OptimConfig(lr=0.05, warmup_steps=1))
    module.set_global_batch_size(4)
    opt = module.configure_optimizers()
    last = {n: p for n, p in module.student.named_parameters() if "last_layer" in n}
    assert len(last) == 4  # v and g of both heads
    start = {n: p.detach().clone() for n, p in last.items()}
    b1, b2 = opt.defaults["betas"]
    m = {n: torch.zeros_like(p) for n, p in last.items()}
    v = {n: torch.zeros_like(p) for n, p in last.items()}
    for step in range(n_frozen + 1):
        before = {n: p.detach().clone() for n, p in last.items()}
        out = module.manual_step(_parity_batch(seed=step), opt, step=step)
        assert float(out["skipped"]) == 0.0
        values = module.schedule_at(step)
        group = next(g for g in opt.param_groups if g["is_last_layer"])
        assert group["lr"] == values.last_layer_lr * group["lr_mult"]
        for n, p in last.items():
            grad = p.grad  # after clipping: what AdamW saw
            m[n] = b1 * m[n] + (1 - b1) * grad
            v[n] = b2 * v[n] + (1 - b2) * grad * grad
            state = opt.state[p]
            assert float(state["step"]) == step + 1
            torch.testing.assert_close(state["exp_avg"], m[n], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(state["exp_avg_sq"], v[n], rtol=1e-6, atol=1e-12)
            if step < n_frozen:
                assert values.last_layer_lr == 0.0
                assert torch.equal(p, start[n]), n  # lr 0: not a single bit moved
                continue
            # first unfrozen step: AdamW with bias corrections of step n_frozen + 1
            lr, wd, t = group["lr"], group["weight_decay"], step + 1
            denom = (v[n] / (1 - b2**t)).sqrt() + opt.defaults["eps"]
            expected = before[n] * (1 - lr * wd) - lr * (m[n] / (1 - b1**t)) / denom
            assert lr > 0 and not torch.equal(p, start[n])
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- clipping
def _grads_after_backward(module) -> None:
    batch = _parity_batch()
    module.student.zero_grad(set_to_none=True)
    losses = module.compute_losses(
        module.student_output(batch), module.teacher_output(batch, TEACHER_TEMP), batch
    )
    losses["total"].backward()


def _ref_clip(params: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """torch.nn.utils.clip_grad_norm_ on detached copies (what FSDP's module.clip_grad_norm_ does)."""
    copies = []
    for p in params:
        c = p.detach().clone().requires_grad_(True)
        c.grad = p.grad.detach().clone()
        copies.append(c)
    norm = torch.nn.utils.clip_grad_norm_(copies, max_norm)
    return [c.grad for c in copies], norm


@pytest.mark.parametrize("separate_ibot_head", [True, False])
def test_per_module_clipping_matches_dinov2(separate_ibot_head):
    """(e) backbone, DINO head, iBOT head (one module when shared) each clipped to clip_grad."""
    clip = 0.05  # small enough that every module is clipped
    module = _parity_module(separate_ibot_head=separate_ibot_head, optim=OptimConfig(clip_grad=clip))
    opt = module.configure_optimizers()
    _grads_after_backward(module)
    modules = list({id(m): m for m in module.student.values()}.values())
    assert len(modules) == (3 if separate_ibot_head else 2)
    refs = [_ref_clip([p for p in m.parameters() if p.grad is not None], clip) for m in modules]
    norm = module.clip_gradients_(opt)
    pre = torch.stack([r[1] for r in refs])
    assert (pre > clip).all()
    torch.testing.assert_close(norm, pre.norm())  # the global norm, sqrt(sum_i n_i^2), for logs / guard
    for m, (ref_grads, _) in zip(modules, refs, strict=True):
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= clip * (1 + 1e-5)


def test_global_clipping_switch():
    """``clip_grad_per_module=False``: one norm over all student parameters, as before."""
    module = _parity_module(optim=OptimConfig(clip_grad=0.05, clip_grad_per_module=False))
    opt = module.configure_optimizers()
    _grads_after_backward(module)
    params = [p for p in module.student.parameters() if p.grad is not None]
    ref_grads, ref_norm = _ref_clip(params, 0.05)
    norm = module.clip_gradients_(opt)
    torch.testing.assert_close(norm, ref_norm)
    for p, r in zip(params, ref_grads, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- schedules
class RefCosineScheduler:
    """dinov2.utils.utils.CosineScheduler."""

    def __init__(
        self, base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0, freeze_iters=0
    ):
        self.final_value, self.total_iters = final_value, total_iters
        freeze_schedule = np.zeros(freeze_iters)
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
        iters = np.arange(total_iters - warmup_iters - freeze_iters)
        schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
        self.schedule = np.concatenate((freeze_schedule, warmup_schedule, schedule))
        assert len(self.schedule) == self.total_iters

    def __getitem__(self, it):
        return self.final_value if it >= self.total_iters else self.schedule[it]


def test_schedules_match_dinov2_cosine_scheduler():
    """(f) build_schedulers at every step (and past the end), counted in steps instead of epochs."""
    total, warmup, temp_warmup, freeze = 60, 7, 13, 5
    optim = OptimConfig(lr=4e-3, min_lr=1e-6, warmup_steps=warmup, weight_decay=0.04, weight_decay_end=0.4)
    teacher = dict(
        teacher_temp_warmup=0.04,
        teacher_temp=0.07,
        teacher_temp_warmup_steps=temp_warmup,
        momentum=0.992,
        momentum_end=1.0,
        freeze_last_layer_steps=freeze,
    )
    ours = build_schedules(optim, teacher, global_batch_size=256, total_steps=total)
    lr = dict(
        base_value=4e-3 * math.sqrt(256 / 1024), final_value=1e-6, total_iters=total, warmup_iters=warmup
    )
    ref = {
        "lr": RefCosineScheduler(**lr),
        "weight_decay": RefCosineScheduler(0.04, 0.4, total),
        "momentum": RefCosineScheduler(0.992, 1.0, total),
        "teacher_temp": RefCosineScheduler(0.07, 0.07, temp_warmup, temp_warmup, 0.04),
        "last_layer_lr": RefCosineScheduler(**lr),
    }
    ref["last_layer_lr"].schedule[:freeze] = 0
    for step in range(total + 5):
        values = ours.at(step)
        for key, sched in ref.items():
            assert getattr(values, key) == pytest.approx(float(sched[step]), rel=1e-12, abs=1e-18), (
                key,
                step,
            )
    assert ours.at(warmup - 1).lr == ours.at(warmup).lr == lr["base_value"]  # the peak, reached at W - 1
    assert ours.at(temp_warmup - 1).teacher_temp == 0.07 and ours.at(0).teacher_temp == 0.04
