"""The Prompt pytree every task sampler returns, and the check that a function taking one prompt got one."""

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt (or a batch of them, with a leading batch axis on every leaf).

    inputs:  [T, D] tokens fed to the model.
    targets: [T] (or [T, K]) what the model should predict at each position.
    mask:    [T] loss weights; 1 where a position's prediction counts.
    info:    dict of task metadata (e.g. the task vector `w`), never fed to the model.
    """

    inputs: jax.Array
    targets: jax.Array
    mask: jax.Array
    info: dict = dataclasses.field(default_factory=dict)


def check_one_prompt(name: str, tokens: jax.Array, width: int | None = None, fields: str = "",
                     length: int | None = None) -> None:
    """ValueError unless tokens is one prompt [length, width] (any length or width where None), naming `name` (the
    function that takes it) and, for a wrong length or width, the config `fields` that set them. A batch [B, T, D]
    would pass for B positions of tokens [T, D] (wrong shapes, a shift along the batch axis, or an error about the
    wrong axis), tokens of another width would be sliced into plausible wrong fields, and tokens of another length
    into other positions."""
    t, d = ("T" if length is None else length), ("D" if width is None else width)
    if tokens.ndim != 2:
        raise ValueError(f"{name} takes one prompt, tokens [{t}, {d}], got shape {tokens.shape}: jax.vmap it over a "
                         f"batch [B, {t}, {d}]")
    wrong = [f"{what} {n}" for what, n, want in (("width", tokens.shape[1], width), ("length", tokens.shape[0], length))
             if want is not None and n != want]
    if wrong:
        raise ValueError(f"{name} takes tokens [{t}, {d}]{f' ({fields})' if fields else ''}, got tokens of "
                         f"{' and '.join(wrong)} (shape {tokens.shape})")
