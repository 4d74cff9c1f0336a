"""Flax NNX models, used functionally through jaxicl.models.functional."""

from jaxicl.models.attention import SelfAttention
from jaxicl.models.base import Model
from jaxicl.models.functional import apply, predictor

__all__ = ["Model", "SelfAttention", "apply", "predictor"]
