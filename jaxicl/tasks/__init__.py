"""Task families: each module has a frozen config dataclass and a one-prompt sampler: `sample(cfg, key) -> Prompt`,
or for boards and instructions the `.sampler(split)` of the data built from the config (the boards' also taking the
training step); `batching` batches any of them (sample_batch)."""

from jaxicl.tasks.batching import check_divisible, fixed_set_key, sample_batch

__all__ = ["check_divisible", "fixed_set_key", "sample_batch"]
