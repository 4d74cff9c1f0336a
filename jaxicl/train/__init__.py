"""Training engine: configs, optimiser, looped data-parallel steps, checkpoints, metrics, vmapped sweeps."""

from jaxicl.train.checkpoint import CheckpointStore
from jaxicl.train.config import TrainConfig
from jaxicl.train.loop import NonFiniteLossError, TrainResult, train
from jaxicl.train.losses import cross_entropy_loss, masked_mean, per_position_loss, query_mse, regression_loss
from jaxicl.train.metrics import read_metrics
from jaxicl.train.optim import make_optimizer
from jaxicl.train.state import TrainState, data_key, eval_key, init_state
from jaxicl.train.step import LossFn
from jaxicl.train.mesh import data_mesh, portable, replicated, sweep_mesh
from jaxicl.train.sweep import SweepResult, train_sweep
from jaxicl.train.sweep_memory import estimate_memory
from jaxicl.train.sweep_spec import Axis, grid, parse_axes

__all__ = ["Axis", "CheckpointStore", "LossFn", "NonFiniteLossError", "SweepResult", "TrainConfig", "TrainResult",
           "TrainState", "cross_entropy_loss", "data_key", "data_mesh", "estimate_memory", "eval_key", "grid", "init_state",
           "make_optimizer", "masked_mean", "parse_axes", "per_position_loss", "portable", "query_mse", "read_metrics",
           "regression_loss", "replicated", "sweep_mesh", "train", "train_sweep"]
