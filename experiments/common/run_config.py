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


def optimizer_note(train) -> str:
    """The run's optimiser as a check's note states it, from its TrainConfig: e.g. "sgd lr 0.01 constant" or
    "adam lr 0.003 warmup-cosine (50 warmup steps), clip 1.0" (notes built from the config, not fixed text)."""
    schedule = "constant" if train.schedule == "constant" else f"warmup-cosine ({train.warmup_steps} warmup steps)"
    clip = f", clip {train.clip_norm:g}" if train.clip_norm else ""
    decay = f", weight decay {train.weight_decay:g}" if train.weight_decay else ""
    return f"{train.optimizer} lr {train.lr:g} {schedule}{decay}{clip}"
