"""build_standalone: a config -> module + optimiser + synthetic batch, one training step, no Trainer."""

import torch

from ssl_path.cli.train import build_standalone


def test_build_standalone_runs_a_training_step(compose_train, tmp_path):
    cfg = compose_train(["experiment=smoke", f"paths.output_dir={tmp_path}", "model.head.out_dim=64"])
    module, optimizer, batch = build_standalone(cfg, device="cpu", batch_size=2)
    assert batch["global_crops"].shape == (4, 3, 64, 64)
    assert batch["local_crops"].shape == (4, 3, 32, 32)
    assert batch["masks"].shape == (4, 16) and batch["masks"].any()
    teacher_before = [p.clone() for p in module.teacher.parameters()]
    out = module.manual_step(batch, optimizer, step=10)
    assert torch.isfinite(out["total"]) and out["grad_norm"] > 0
    assert any(
        not torch.equal(a, b) for a, b in zip(teacher_before, module.teacher.parameters(), strict=True)
    )
