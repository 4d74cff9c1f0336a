"""The Prompt pytree every task sampler returns, and the check that a model or function taking one prompt got one."""

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
    function that takes it) and the config `fields` that set its length and width. A batch [B, T, D] would pass for
    B positions of tokens [T, D] (wrong shapes, a shift along the batch axis, or an error about the wrong axis),
    tokens of another width would be sliced into plausible wrong fields, and tokens of another length into other
    positions."""
    check_prompt_shape(name, tokens.shape, (length, width), fields)


def check_prompt_shape(name: str, shape: tuple[int, ...], want: tuple[int | None, ...], about: str = "",
                       batched: str = "") -> None:
    """ValueError unless `shape` is that of one prompt of tokens [length] (want (length,): token ids) or
    [length, width] (want (length, width)), any size where None: the one message of every such check, naming `name`
    (what takes the prompt), the shape it takes and `about` (what the tokens are, or the config fields that set
    their shape), and for a batch how to run `name` on one (batched; default: jax.vmap it)."""
    dims = ", ".join(("T", "D")[i] if n is None else str(n) for i, n in enumerate(want))
    takes = f"tokens [{dims}]" + (f" ({about})" if about else "")
    if len(shape) != len(want):
        batched = batched or f"jax.vmap it over a batch [B, {dims}]"
        raise ValueError(f"{name} takes one prompt, {takes}, got shape {shape}: {batched}")
    wrong = [f"{what} {shape[axis]}" for what, axis in (("width", 1), ("length", 0))
             if axis < len(want) and want[axis] is not None and shape[axis] != want[axis]]
    if wrong:
        raise ValueError(f"{name} takes {takes}, got tokens of {' and '.join(wrong)} (shape {shape})")
