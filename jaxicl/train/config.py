"""TrainConfig: the optimiser, schedule, batch and bookkeeping of one training run."""

import dataclasses

from jaxicl.prng import PRNG_IMPLS
from jaxicl.train.cpu_matmuls import CPU_MATMULS
from jaxicl.validation import (ConfigError, check_choice, check_integer, check_number, check_positive, check_range,
                               check_seed)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine")
# Not decayed by default: biases (any name containing 'bias'), LayerNorm scales, embeddings and position tables. (Not
# a bare 'b': the autoregressive models' B is a weight matrix.) The continuous-input GPT's linear embedding W_E
# [input_dim, D] is `embed` too, so it is left undecayed like the position table added to it (unlike HF and nanoGPT,
# which decay every matrix; experiments.affine_mechanism trains it with Adam, no decay): drop "embed*" to decay it.
# Position tables by their names only (GPT's pos_embed, FactorTransformer's pos_table, PositionalTransformer's
# positions, LEA's picture_pos and speech_pos; pos, pos_emb, position_embedding(s), ...), not by a "pos" prefix: that
# also matched post_proj, postnorm, pos_ffn, positionwise_ffn or w_post, and left those weight matrices undecayed.
# A pattern matches any component of a path (optim.decay_mask), so a module's name exempts all of its parameters.
NO_DECAY = ("*bias*", "scale", "embed*", "*_embed", "embedding", "pos", "*_pos", "positions", "pos_table", "pos_emb*",
            "position_emb*", "positional_emb*")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's (b1, b2)
    schedule: str = "constant"  # "warmup_cosine": linear warmup to lr, cosine decay to 0 at `steps`
    warmup_steps: int = 0
    weight_decay: float = 0.0  # adamw only
    no_decay: tuple[str, ...] = NO_DECAY  # glob patterns of parameter path names adamw does not decay
    clip_norm: float = 0.0  # global gradient-norm clipping; 0 = off
    seed: int = 0
    prng_impl: str = PRNG_IMPLS[0]  # the generator of the training batches (threefry2x32, JAX's default)
    cpu_matmuls: str = CPU_MATMULS[0]  # the library of the chunks' products on CPU (jaxicl.train.cpu_matmuls)
    steps_per_call: int = 100  # the most steps of one compiled call (its loop keeps the metrics of this many)
    log_every: int = 10  # write every log_every-th step's metrics to metrics.jsonl
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 3
    stop_loss: float = 0.0  # > 0: stop at the first step whose loss (before its update) is below this

    def __post_init__(self):
        for name in ("steps", "batch_size", "steps_per_call", "log_every", "keep_checkpoints", "warmup_steps",
                     "checkpoint_every"):
            check_integer(name, getattr(self, name))
        for name in ("steps", "batch_size", "steps_per_call", "log_every", "keep_checkpoints"):
            check_positive(name, getattr(self, name))
        for name in ("warmup_steps", "weight_decay", "clip_norm", "checkpoint_every", "stop_loss"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_positive("lr", self.lr)
        check_seed("seed", self.seed)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("prng_impl", self.prng_impl, PRNG_IMPLS)
        check_choice("cpu_matmuls", self.cpu_matmuls, CPU_MATMULS)
        check_range("warmup_steps", self.warmup_steps, 0, self.steps)
        if self.warmup_steps and self.schedule == "constant":
            raise ConfigError(f"warmup_steps={self.warmup_steps} needs schedule='warmup_cosine' (schedule='constant' "
                              f"has no warmup); set warmup_steps=0 or schedule='warmup_cosine'")
        if not isinstance(self.no_decay, (tuple, list)) or not all(isinstance(p, str) for p in self.no_decay):
            string = " (a string: each of its characters would be a pattern)" if isinstance(self.no_decay, str) else ""
            raise ConfigError(f"no_decay must be a tuple of glob patterns (str) of parameter path names, e.g. "
                              f"('*bias*', 'scale'), got {self.no_decay!r}{string}")
        object.__setattr__(self, "no_decay", tuple(self.no_decay))  # a list (e.g. from JSON) as the tuple it stands for
        try:
            betas = tuple(self.betas)  # a list (e.g. from JSON) as the tuple it stands for
        except TypeError:
            raise ConfigError(f"betas must be two values in [0, 1), got {self.betas!r}") from None
        for i, b in enumerate(betas):
            check_number(f"betas[{i}]", b)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"betas must be two values in [0, 1), got {self.betas}")
        object.__setattr__(self, "betas", betas)
        # fields the optimiser would ignore, as weight_decay below
        if betas != TrainConfig.betas and self.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"betas={betas} are Adam's: they need optimizer='adam' or 'adamw', got "
                              f"optimizer={self.optimizer!r}")
        if self.no_decay != NO_DECAY and self.optimizer != "adamw":
            raise ConfigError(f"no_decay={self.no_decay} names what adamw does not decay: it needs optimizer='adamw', "
                              f"got optimizer={self.optimizer!r}")
        if self.weight_decay and self.optimizer != "adamw":
            raise ConfigError(f"weight_decay={self.weight_decay} needs optimizer='adamw', "
                              f"got optimizer={self.optimizer!r}")
