"""Flax NNX models, used functionally through jaxicl.models.functional."""

from jaxicl.models.attention import SelfAttention
from jaxicl.models.functional import apply, label_prediction, predictor

__all__ = ["SelfAttention", "apply", "label_prediction", "predictor"]
