"""jaxicl: in-context learning research in JAX.

Importing jaxicl touches no device, so callers may still set `jax_num_cpu_devices` or call
`jax.distributed.initialize()` afterwards.
"""

from jaxicl.prompt import Prompt
from jaxicl.sites import Patch, Sites
from jaxicl.validation import ConfigError

__all__ = ["ConfigError", "Patch", "Prompt", "Sites"]
