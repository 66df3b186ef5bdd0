"""Records the aten ops that make the host wait for the device (a CUDA sync), visible on the CPU too."""

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# ops whose result the host must read: a device->host copy, or an output size that depends on data
_SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t)
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.masked_scatter.default,
    aten.unique_dim.default,
    aten._unique2.default,
    aten.repeat_interleave.Tensor,
}


class SyncRecorder(TorchDispatchMode):
    """Records every aten op above, plus indexing with a boolean mask (it calls nonzero inside)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            self.syncs.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.syncs.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


class StepSyncs(L.Callback):
    """Records the syncs from one batch start to the next (put it first in the callback list): the
    training step, backward, clipping, the optimiser, the EMA and every batch-end hook."""

    def __init__(self):
        self.per_step: list[list[str]] = []
        self._mode = None

    def _close(self):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.per_step.append(self._mode.syncs)
            self._mode = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._close()
        self._mode = SyncRecorder().__enter__()

    def on_train_end(self, trainer, module):
        self._close()
