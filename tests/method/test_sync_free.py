"""The training step never makes the host wait for the device (outside logging steps).

A CUDA sync is what `.item()`, `bool(t)`, boolean-mask indexing and `nonzero` cost: the host must
know a value (or an output size) computed on the device. These ops are visible on the CPU too, as
aten calls, so a TorchDispatchMode that records them proves the step sync-free without a GPU.
"""

import pytest
import torch
from torch.utils.data import DataLoader

from ssl_path.data.synthetic import synthetic_batch
from ssl_path.method import DINOv2Module
from tests.helpers.sync import StepSyncs, SyncRecorder
from tests.method.tiny import cpu_trainer, tiny_module


def _module(**overrides) -> DINOv2Module:
    defaults = dict(teacher_temp_warmup_steps=2, freeze_last_layer_steps=1, koleo_weight=0.1, kde_weight=0.1)
    return tiny_module(**{**defaults, **overrides})


def _batch(seed: int = 0, poison: bool = False) -> dict:
    b = synthetic_batch(2, 2, 2, 32, 16, patch_size=16, mask_probability=0.5, mask_ratio=0.5, seed=seed)
    if poison:
        b["global_crops"][0, 0, 0, 0] = float("nan")
    return b


def _manual_steps(module: DINOv2Module, batches: list[dict], optimizer=None) -> tuple[list[str], list]:
    module.set_global_batch_size(2)
    optimizer = optimizer or module.configure_optimizers()
    outs = []
    with SyncRecorder() as rec:
        for step, batch in enumerate(batches):
            outs.append(module.manual_step(batch, optimizer, step=step))
    return rec.syncs, outs


@pytest.mark.parametrize(
    "centering, overrides",
    [("sinkhorn_knopp", {}), ("softmax", {}), ("sinkhorn_knopp", {"pack_crops": True})],
)
def test_manual_step_is_sync_free_including_a_skipped_step(centering, overrides):
    module = _module(centering=centering, **overrides)
    syncs, outs = _manual_steps(module, [_batch(0), _batch(1, poison=True), _batch(2)])
    assert syncs == []
    assert [float(o["skipped"]) for o in outs] == [0.0, 1.0, 0.0]  # read after the steps, not during
    assert module.nonfinite_total == 1 and module.nonfinite_in_a_row == 0


def test_recorder_sees_the_syncs_it_is_meant_to_catch():
    """Control: the same step does sync when the batch lacks mask_indices or the optimiser is not fused."""
    module = _module()
    batch = _batch(0)
    del batch["mask_indices"]
    syncs, _ = _manual_steps(module, [batch])
    assert "aten.nonzero.default" in syncs

    module = _module()
    module.set_global_batch_size(2)
    foreach = torch.optim.AdamW(module.student.parameters(), lr=1e-3, foreach=True)
    for g in foreach.param_groups:
        g.update(lr_mult=1.0, wd_mult=1.0, is_last_layer=False)
    syncs, _ = _manual_steps(module, [_batch(0)], optimizer=foreach)
    assert any("_local_scalar_dense" in s or "is_nonzero" in s for s in syncs)

    with SyncRecorder() as rec:
        x = torch.randn(4, 3)
        x[x[:, 0] > 0]
    assert rec.syncs and "boolean mask" in rec.syncs[0]


def test_lightning_steps_are_sync_free_between_logging_steps():
    module = _module(max_nonfinite_steps=2, plateau_after_steps=0)  # the plateau check reads on logging steps
    rec = StepSyncs()
    batches = [_batch(i, poison=(i == 2)) for i in range(6)]
    trainer = cpu_trainer(6, log_every_n_steps=4, callbacks=[rec])
    trainer.fit(module, DataLoader(batches, batch_size=None, collate_fn=lambda x: x))
    assert len(rec.per_step) == 6
    # Lightning writes step metrics when (step + 1) % 4 == 0; the module also logs the first and the
    # last step. Only those read device values; the others, the skipped step 2 included, never do.
    for i, syncs in enumerate(rec.per_step):
        if i not in (0, 3, 5):
            assert syncs == [], (i, syncs)
    assert module.nonfinite_total == 1
    assert trainer.callback_metrics["train/nonfinite_steps"].item() == 1
