"""Compile and FSDP2 sharding of the student and the teacher: one ``parallelize`` per model.

Order as in DINOv3 (``dinov3/fsdp/ac_compile_parallelize.py``): activation checkpointing first (set
when the student is built, ``DINOv2Module(activation_checkpointing=True)``, so it holds with or without
this function), then each transformer block is compiled in place, then every block is sharded on its
own (``torch.distributed.fsdp.fully_shard``), then each backbone and head as a root. The teacher is
sharded exactly like the student, so the EMA runs on matching local shards (``ema.ema_update`` uses
``DTensor.to_local``). Public APIs only.

Used under Lightning's ``ModelParallelStrategy`` (``configs/trainer/fsdp.yaml``), whose device mesh
``DINOv2Module.configure_model`` receives; data-parallel size = world size (pure FSDP, no TP).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def parallelize(
    model: nn.ModuleDict,
    mesh: DeviceMesh | None = None,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
    compile_options: dict[str, Any] | None = None,
) -> None:
    """Compile (``compile_options`` given) and shard (``mesh`` given) ``model`` in place.

    Args:
        model: a student or teacher ``nn.ModuleDict`` (``backbone``, ``dino_head``, ``ibot_head``) as
            built by ``DINOv2Module``, or one holding a ``backbone`` only (the Gram teacher).
        mesh: 1-D data-parallel device mesh (``ModelParallelStrategy.device_mesh["data_parallel"]``);
            ``None``: no sharding.
        reshard_after_forward: free gathered block weights after forward (ZeRO-3); ``False`` keeps
            them until backward (ZeRO-2: faster, more memory).
        mp_policy: FSDP2 mixed precision, e.g. bf16 parameters for compute and all-gathers with fp32
            gradient reduction (the sharded master weights, AdamW and the EMA stay fp32).
        compile_options: ``block.compile(**compile_options)`` for every transformer block, in place, so
            state-dict keys stay free of ``_orig_mod.``; ``None``: eager.
    """
    blocks = model["backbone"].vit.blocks
    if compile_options is not None:
        for block in blocks:
            block.compile(**compile_options)
        _allow_a_graph_per_block(len(blocks))
    if mesh is None:
        return
    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model["backbone"], **kw)
    # the iBOT head may be shared; a Gram teacher has a backbone only
    heads = {id(model[name]): model[name] for name in ("dino_head", "ibot_head") if name in model}
    for head in heads.values():
        fully_shard(head, **kw)


def _allow_a_graph_per_block(n_blocks: int) -> None:
    """Raise dynamo's recompile limit so that no compiled block silently falls back to eager.

    All blocks share ``Block.forward``'s code, so dynamo keys one cache on it: a graph per (crop shape,
    train/eval, grad mode), shared by every block because drop-path rates are buffers
    (models/drop_path.py): teacher, student global and student local crops make 3. Subset drop path on
    a ramp (rates > 0.1 differ per block) needs a graph per rate and shape: the limit covers it.
    """
    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(getattr(dynamo, name), 2 * n_blocks + 8))


class DataParallelFSDP(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with a data-parallel mesh over *all* ranks (FSDP2, no TP).

    The parent's ``"auto"`` sizes put tensor parallelism inside a node; DINOv2 training is pure data
    parallel, so the mesh is ``(world_size, 1)``. Checkpoints default to one full-state file written
    by rank 0 through the trainer's ``CheckpointIO`` (atomic: temp file + rename), loadable on any
    world size; ``save_distributed_checkpoint=True`` writes DCP shards into a directory instead
    (faster for ViT-g, but not atomic and bound to a file system all ranks share).

    Args:
        save_distributed_checkpoint: DCP directory (True) or one full-state file (False).
        process_group_backend: ``nccl``/``gloo``; ``None`` picks by device.
        timeout_minutes: collective timeout.
        param_dtype: dtype of the gathered parameters the blocks compute with (``bfloat16`` halves
            all-gather traffic and weight memory in flight); ``None`` keeps fp32.
        reduce_dtype: dtype of the gradient reduce-scatter (``float32``: exact sums across ranks).
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout_minutes: int = 30,
        param_dtype: str | None = None,
        reduce_dtype: str | None = "float32",
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timedelta(minutes=timeout_minutes),
        )
        if param_dtype is not None and _dtype(param_dtype) not in (torch.bfloat16, torch.float32):
            raise ValueError(
                f"trainer.strategy.param_dtype={param_dtype}: use bfloat16 or float32 (fp16 would need "
                "loss scaling, which this trainer does not do)"
            )
        self.mp_policy = (
            None
            if param_dtype is None
            else MixedPrecisionPolicy(param_dtype=_dtype(param_dtype), reduce_dtype=_dtype(reduce_dtype))
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use e.g. bfloat16 or float32")
    return dtype
