"""Task families: each module has a frozen config dataclass and `sample(cfg, key) -> Prompt`."""

from jaxicl.tasks.batching import check_divisible, fixed_set_key, sample_batch

__all__ = ["check_divisible", "fixed_set_key", "sample_batch"]
