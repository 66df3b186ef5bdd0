"""The training runtime, apart from the method: checkpoint IO and cadence, preemption, the non-finite
guard, RNG state, parallelism (compile + FSDP2), telemetry (progress bar, step log lines with the
data-wait share, throughput)."""

from ssl_path.engine.checkpointing import AtomicCheckpointIO, PeriodicCheckpoint
from ssl_path.engine.nonfinite import (
    NonFiniteGuard,
    NonFiniteLossError,
    NonFiniteWeightsError,
    apply_found_inf,
    clear_found_inf,
)
from ssl_path.engine.parallel import DataParallelFSDP, parallelize
from ssl_path.engine.preemption import GracefulStop, SubmititRequeue
from ssl_path.engine.progress import LossProgressBar
from ssl_path.engine.step_log import StepLog
from ssl_path.engine.throughput import ThroughputMeter

__all__ = [
    "AtomicCheckpointIO",
    "DataParallelFSDP",
    "GracefulStop",
    "LossProgressBar",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "PeriodicCheckpoint",
    "StepLog",
    "SubmititRequeue",
    "ThroughputMeter",
    "apply_found_inf",
    "clear_found_inf",
    "parallelize",
]
