"""Training engine: configs, optimiser, scanned data-parallel steps, checkpoints, metrics."""

from jaxicl.train.checkpoint import CheckpointStore
from jaxicl.train.config import TrainConfig
from jaxicl.train.loop import NonFiniteLossError, TrainResult, TrainState, train
from jaxicl.train.losses import masked_mse, regression_loss
from jaxicl.train.mesh import data_mesh, replicated
from jaxicl.train.metrics import read_metrics

__all__ = ["CheckpointStore", "NonFiniteLossError", "TrainConfig", "TrainResult", "TrainState", "data_mesh",
           "masked_mse", "read_metrics", "regression_loss", "replicated", "train"]
