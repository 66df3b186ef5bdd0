"""The DINOv2 method: LightningModule, schedules, parameter groups, optimiser, EMA.

The runtime around it (checkpoints, preemption, non-finite guard, parallelism) is ``ssl_path.engine``.
"""

from ssl_path.method.distill import DistillModule
from ssl_path.method.ema import ema_update
from ssl_path.method.module import DINOv2Module, build_schedules
from ssl_path.method.optim import OptimConfig, build_optimizer, init_state
from ssl_path.method.param_groups import param_groups
from ssl_path.method.schedules import Schedules, ScheduleValues

__all__ = [
    "DINOv2Module",
    "DistillModule",
    "OptimConfig",
    "ScheduleValues",
    "Schedules",
    "build_optimizer",
    "build_schedules",
    "ema_update",
    "init_state",
    "param_groups",
]
