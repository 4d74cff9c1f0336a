"""The run config an experiment stores with its checkpoints."""

import dataclasses


def run_config(name: str, cfg, **extra) -> dict:
    """{"experiment": name, "config": every field of cfg (a dataclass) but its train and task sections, **extra}:
    stored with the checkpoints, so a rerun into the same directory with any other setting (an init scale, the size
    of an evaluation set, a check's threshold) is refused, naming the field, instead of resuming the run the old
    setting made. The engine stores the train and task sections of the run itself (train.steps may then grow where
    the schedule allows)."""
    return {"experiment": name,
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("train", "task")}, **extra}
