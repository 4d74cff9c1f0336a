"""Classical in-context predictors with the model call signature (tokens [T, D] -> predictions [T]), and
best_gd_step(batch) -> (eta [T], loss [T]): the best single gradient-descent step per position, fitted on the
batch it scores (an oracle)."""

from jaxicl.baselines.autoregressive import best_gd_step
from jaxicl.baselines.bayes import dmmse
from jaxicl.baselines.nearest_neighbor import k_nearest_neighbors, one_nearest_neighbor
from jaxicl.baselines.regression import gradient_descent, least_squares, ridge

__all__ = ["best_gd_step", "dmmse", "gradient_descent", "k_nearest_neighbors", "least_squares", "one_nearest_neighbor", "ridge"]
