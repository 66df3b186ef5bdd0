"""The DINOv2 method: LightningModule, schedules, parameter groups, EMA, checkpointing."""

from ssl_path.method.checkpointing import AtomicCheckpointIO, GracefulStop, PeriodicCheckpoint
from ssl_path.method.ema import ema_update
from ssl_path.method.module import DINOv2Module, build_schedules
from ssl_path.method.nonfinite import NonFiniteLossError
from ssl_path.method.optim import OptimConfig, build_optimizer, init_state
from ssl_path.method.parallel import DataParallelFSDP, parallelize
from ssl_path.method.param_groups import param_groups
from ssl_path.method.progress import LossProgressBar
from ssl_path.method.schedules import Schedules, ScheduleValues
from ssl_path.method.synthetic import synthetic_batch

__all__ = [
    "AtomicCheckpointIO",
    "DataParallelFSDP",
    "DINOv2Module",
    "GracefulStop",
    "LossProgressBar",
    "NonFiniteLossError",
    "OptimConfig",
    "PeriodicCheckpoint",
    "ScheduleValues",
    "Schedules",
    "build_optimizer",
    "build_schedules",
    "ema_update",
    "init_state",
    "param_groups",
    "parallelize",
    "synthetic_batch",
]
