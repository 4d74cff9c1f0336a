"""Task families: each module has a frozen config dataclass and `sample(cfg, key) -> Prompt`."""

from jaxicl.tasks.batching import check_divisible, sample_batch

__all__ = ["sample_batch", "check_divisible"]
