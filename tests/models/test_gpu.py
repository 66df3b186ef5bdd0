"""CUDA checks for the model + loss path: bf16 autocast with SDPA, masks, and blocks compiled in place.

Skipped without a GPU (CI); run on a GPU machine with ``pytest tests/models/test_gpu.py``.
"""

from __future__ import annotations

import torch

from ssl_path.losses import (
    dino_loss,
    ibot_mask_weights,
    ibot_patch_loss,
    kde_loss,
    koleo_loss,
    sinkhorn_knopp,
)
from ssl_path.models import DINOHead, create_backbone, export_filter
from tests.helpers.run_if import RunIf


@RunIf(min_gpus=1)
def test_bf16_student_step_with_all_losses():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    bb = create_backbone("vit_s14", drop_path_rate=0.1).to(dev).train()
    head = DINOHead(bb.embed_dim, out_dim=8192).to(dev)
    b, n_g, n_l = 8, 2, 4
    g = torch.randn(n_g * b, 3, 224, 224, device=dev)
    loc = torch.randn(n_l * b, 3, 98, 98, device=dev)
    masks = torch.rand(n_g * b, bb.num_patches(224), device=dev) < 0.3
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_g, out_l = bb(g, masks), bb(loc)
        cls = torch.cat([out_g["cls"], out_l["cls"]])  # (S*B, D)
        logits = head(cls).unflatten(0, (n_g + n_l, b))  # (S, B, K)
        patch_logits = head(out_g["patch"][masks])  # (M, K)
        with torch.no_grad():
            targets = sinkhorn_knopp(logits[:n_g].flatten(0, 1).detach(), 0.04).unflatten(0, (n_g, b))
            patch_targets = sinkhorn_knopp(patch_logits.detach(), 0.04)
        loss = (
            dino_loss(logits, targets, 0.1)
            + ibot_patch_loss(patch_logits, patch_targets, ibot_mask_weights(masks), 0.1, n_images=n_g * b)
            + 0.1 * sum(koleo_loss(c) for c in out_g["cls"].chunk(n_g))
            + 0.1 * kde_loss(out_g["cls"], 0.5)
        )
    assert out_l["patch"].shape == (n_l * b, 49, bb.embed_dim)  # 98 px at patch 14: 7 x 7
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in list(bb.parameters()) + list(head.parameters()) if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert bb.mask_token.grad.abs().sum() > 0


@RunIf(min_gpus=1)
def test_blocks_compiled_in_place_match_eager_and_keep_keys():
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny").cuda().eval()
    keys = set(bb.state_dict())
    x = torch.randn(4, 3, 224, 224, device="cuda")
    masks = torch.rand(4, 196, device="cuda") < 0.5
    with torch.no_grad():
        eager = bb(x, masks)["patch"]
        for block in bb.vit.blocks:
            block.compile()
        compiled = bb(x, masks)["patch"]
    assert set(bb.state_dict()) == keys  # no `_orig_mod.`: exports and checkpoints unchanged
    assert export_filter(bb.state_dict()).keys() == {k.removeprefix("vit.") for k in keys} - {"mask_token"}
    err = (compiled - eager).norm() / eager.norm()
    assert err < 1e-3, err
