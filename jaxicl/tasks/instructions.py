"""Instruction following (Wu & Varshney 2024): an instruction string names one of K tasks, each a function over a
shared set of inputs; the model reads `BOS instruction SEP x ARROW` and answers f_task(x).

Tasks: f [K, n_inputs] with values in the n_outputs answer tokens; every pair of tasks differs on at least
min_task_distance inputs and every input has at least two answers across tasks, so no input alone
determines the answer. Instructions: each task has M families, each a pattern in a small regular-expression
syntax (see `parse_pattern`); strings are sampled from a family and rejected when another task's patterns also
match them, when they repeat a string already made, or when they are longer than max_instruction_len.

Generated patterns (patterns=None; our reconstruction, the paper's grammar is not public): every family of a task
contains the task's keyword (keyword_len letters, different for every task) between 2 to 4 other atoms (a letter,
optionally `?`, or a range of 3 to 6 letters with a quantifier in {1, ?, +, {1,3}}), and can spell at least five
times strings_per_family strings. The keyword is what makes a held-out family of a task recognisable at all.

Splits: train (the first strings of each seen family), validation (new strings of the seen families) and unseen
(every string of the last unseen_families families of each task that no seen family of the task also spells: 196
of 200 at the defaults; at least one of each family, or build refuses the config; never trained on); each string
appears with every input. Generation runs once on the host (`build`, seeded); batches are then drawn on device from the
split's token table (`InstructionData.sampler`).

Token ids: PAD 0, BOS 1, SEP 2, ARROW 3, EOS 4, then the letters, the inputs and the answers. A sequence
`BOS letters SEP x ARROW y EOS PAD...` has length max_instruction_len + 6; a prompt is its first T - 1 tokens
(inputs) and the next token at each position (targets, [T - 1]); the answer is predicted at the ARROW position.
"""

import dataclasses
import functools
import re
import string

import jax
import jax.numpy as jnp
import numpy as np

from jaxicl.models.gpt import lookup
from jaxicl.prompt import Prompt
from jaxicl.validation import ConfigError, check_choice, check_integer, check_positive, check_range

PAD, BOS, SEP, ARROW, EOS = range(5)
N_SPECIAL = 5
LOSSES = ("answer", "all")  # the loss on the answer token only, or on every next token (PAD excluded)
SPLITS = ("train", "validation", "unseen")
QUANTIFIERS = ("", "?", "+", "{1,3}")  # of a generated range atom


@dataclasses.dataclass(frozen=True)
class Atom:
    """letters: the characters it may produce; it repeats between low and high times (high None: unbounded)."""

    letters: str
    low: int
    high: int | None


def parse_pattern(text: str, alphabet: str, field: str = "pattern") -> tuple[Atom, ...]:
    """The atoms of a pattern: a letter, `.` (any letter) or a class `[a-ex]` of letters and ranges, each with an
    optional quantifier `?`, `+`, `*`, `{m}` or `{m,n}`. The syntax is a subset of Python's `re`, which matches it.

    Raises ConfigError naming `field` and the position of a syntax error or of a letter outside the alphabet.
    """
    atoms, i = [], 0

    def fail(msg: str, at: int | None = None):
        raise ConfigError(f"{field}: {msg} at position {i if at is None else at} of {text!r}")

    def letter(at: int) -> str:
        if text[at] not in alphabet:
            fail(f"letter {text[at]!r} is not in the alphabet {alphabet!r}", at)
        return text[at]

    while i < len(text):
        c = text[i]
        if c == ".":
            letters, i = alphabet, i + 1
        elif c == "[":
            end = text.find("]", i)
            if end < 0:
                fail("unclosed '['")
            body, chosen, j = text[i + 1:end], [], 0
            while j < len(body):
                at = i + 1 + j  # body[j] in text
                if j + 2 < len(body) and body[j + 1] == "-":
                    lo, hi = alphabet.find(letter(at)), alphabet.find(letter(at + 2))
                    if lo > hi:
                        fail(f"empty range {body[j:j + 3]!r}", at)
                    chosen.extend(alphabet[lo:hi + 1])
                    j += 3
                else:
                    chosen.append(letter(at))
                    j += 1
            if not chosen:
                fail("empty class '[]'")
            letters, i = "".join(dict.fromkeys(chosen)), end + 1
        elif c in "?+*{}]":
            fail(f"quantifier or bracket {c!r} without an atom before it")
        else:
            letters, i = letter(i), i + 1
        low, high = 1, 1
        if i < len(text) and text[i] in "?+*":
            low, high = {"?": (0, 1), "+": (1, None), "*": (0, None)}[text[i]]
            i += 1
        elif i < len(text) and text[i] == "{":
            m = re.match(r"\{(\d+)(?:,(\d+))?\}", text[i:])
            if not m:
                fail("malformed repetition '{m}' or '{m,n}'")
            low = int(m.group(1))
            high = low if m.group(2) is None else int(m.group(2))
            if high < low or high == 0:
                fail(f"repetition {m.group(0)} needs 0 <= m <= n, n >= 1")
            i += m.end()
        atoms.append(Atom(letters, low, high))
    if not atoms:
        raise ConfigError(f"{field}: empty pattern")
    return tuple(atoms)


def sample_string(atoms: tuple[Atom, ...], rng: np.random.Generator, max_repeat: int) -> str:
    """One string of the pattern; an unbounded quantifier repeats at most max_repeat times."""
    out = []
    for a in atoms:
        high = max(a.low, max_repeat) if a.high is None else a.high
        out.extend(rng.choice(list(a.letters), size=int(rng.integers(a.low, high + 1))))
    return "".join(out)


def pattern_capacity(atoms: tuple[Atom, ...], max_len: int, max_repeat: int) -> int:
    """How many letter sequences of at most max_len letters the pattern can produce (an upper bound on its
    distinct strings: different atom splits may spell the same string)."""
    by_len = np.zeros(max_len + 1, object)
    by_len[0] = 1
    for a in atoms:
        high = max(a.low, max_repeat) if a.high is None else a.high
        new = np.zeros_like(by_len)
        for r in range(a.low, min(high, max_len) + 1):
            new[r:] += by_len[:max_len + 1 - r] * len(a.letters) ** r
        by_len = new
    return int(by_len.sum())


@dataclasses.dataclass(frozen=True)
class Instructions:
    """The task's configuration; every default is our reconstruction (shared/papers/clustering_wu2024.md, [R])."""

    n_tasks: int = 10  # K
    n_families: int = 5  # M instruction families per task
    unseen_families: int = 1  # per task, held out of training (the unseen split)
    strings_per_family: int = 20
    validation_strings: int = 6  # of each seen family's strings, held out for validation
    n_letters: int = 26  # instruction alphabet: the first n_letters of a..z
    n_inputs: int = 5  # inputs shared by every task
    n_outputs: int = 10  # answer tokens
    min_task_distance: int = 3  # every pair of tasks differs on at least this many inputs
    max_instruction_len: int = 12
    max_repeat: int = 3  # the longest run of an unbounded quantifier (+, *) when sampling
    keyword_len: int = 2  # generated patterns only
    patterns: tuple[tuple[str, ...], ...] | None = None  # [K][M] patterns; None: generated from seed
    loss: str = "answer"
    seed: int = 0

    def __post_init__(self):
        for name in ("n_tasks", "n_families", "unseen_families", "strings_per_family", "validation_strings",
                     "n_letters", "n_inputs", "n_outputs", "min_task_distance", "max_instruction_len", "max_repeat",
                     "keyword_len", "seed"):
            check_integer(name, getattr(self, name))
        for name in ("n_tasks", "n_families", "strings_per_family", "n_letters", "n_inputs", "n_outputs",
                     "max_instruction_len", "max_repeat", "keyword_len"):
            check_positive(name, getattr(self, name))
        check_positive("seed", self.seed, allow_zero=True)  # numpy's default_rng refuses a negative seed at build
        check_range("n_tasks", self.n_tasks, 2)
        check_range("n_letters", self.n_letters, 1, 26)
        check_range("n_outputs", self.n_outputs, 2)
        check_range("unseen_families", self.unseen_families, 0, self.n_families - 1)
        check_range("validation_strings", self.validation_strings, 0, self.strings_per_family - 1)
        check_range("min_task_distance", self.min_task_distance, 1, self.n_inputs)
        check_choice("loss", self.loss, LOSSES)
        if self.patterns is not None:
            shape = [len(p) for p in self.patterns]
            if len(self.patterns) != self.n_tasks or any(n != self.n_families for n in shape):
                raise ConfigError(f"patterns must hold n_families={self.n_families} patterns for each of the "
                                  f"n_tasks={self.n_tasks} tasks, got {len(self.patterns)} tasks with {shape}")
        elif self.n_letters ** self.keyword_len < self.n_tasks:
            raise ConfigError(f"n_tasks={self.n_tasks} is too large for the alphabet: n_letters={self.n_letters} "
                              f"makes only {self.n_letters ** self.keyword_len} keywords of keyword_len="
                              f"{self.keyword_len}")

    @property
    def alphabet(self) -> str:
        return string.ascii_lowercase[:self.n_letters]

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + self.n_letters + self.n_inputs + self.n_outputs

    @property
    def seq_len(self) -> int:
        """Tokens of a stored sequence; a prompt (inputs, targets) is one shorter."""
        return self.max_instruction_len + 6

    def letter_token(self, c: str) -> int:
        return N_SPECIAL + self.alphabet.index(c)

    def input_token(self, x) -> int:
        return N_SPECIAL + self.n_letters + x

    def answer_token(self, y):
        return N_SPECIAL + self.n_letters + self.n_inputs + y


@dataclasses.dataclass(frozen=True)
class Split:
    """One split's sequences: tokens [N, seq_len], task, family, x, answer (token id) and arrow (the ARROW index)
    [N]; instruction_mask [N, seq_len] marks the instruction letters; strings [N] the instructions."""

    tokens: np.ndarray
    task: np.ndarray
    family: np.ndarray
    x: np.ndarray
    answer: np.ndarray
    arrow: np.ndarray
    instruction_mask: np.ndarray
    strings: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.task)


@dataclasses.dataclass(frozen=True, eq=False)
class InstructionData:
    """What `build` makes: the task table f [K, n_inputs] (answer indices), the patterns [K][M] and the splits."""

    cfg: Instructions
    table: np.ndarray
    patterns: tuple[tuple[str, ...], ...]
    splits: dict

    @functools.cache
    def sampler(self, split: str = "train"):
        """sample(cfg, key) -> Prompt of one sequence drawn uniformly from the split, on device (the split's table
        is a device array; the same function object each call, so jitted callers compile once)."""
        check_choice("split", split, SPLITS)
        s = self.splits[split]
        if not len(s):  # train never is, and build leaves no unseen family empty where unseen_families >= 1
            field = {"validation": "validation_strings", "unseen": "unseen_families"}[split]
            raise ConfigError(f"the {split} split is empty: {field}=0")
        arrays = {k: jnp.asarray(getattr(s, k)) for k in ("tokens", "task", "x", "answer", "arrow")}
        return functools.partial(_sample_row, arrays)

    def prompts(self, split: str, rows: np.ndarray | None = None) -> Prompt:
        """The split's sequences (or those of `rows`) as a batch of prompts [N, T - 1]."""
        s = self.splits[split]
        rows = np.arange(len(s)) if rows is None else rows
        return as_prompt(self.cfg, jnp.asarray(s.tokens[rows]), jnp.asarray(s.arrow[rows]),
                         {"task": jnp.asarray(s.task[rows]), "x": jnp.asarray(s.x[rows]),
                          "answer": jnp.asarray(s.answer[rows])})


def as_prompt(cfg: Instructions, tokens: jax.Array, arrow: jax.Array, info: dict) -> Prompt:
    """Prompt(s) from sequences tokens [..., seq_len] whose ARROW sits at `arrow` [...]."""
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    if cfg.loss == "answer":
        mask = (jnp.arange(targets.shape[-1]) == arrow[..., None]).astype(jnp.float32)
    else:
        mask = (targets != PAD).astype(jnp.float32)
    return Prompt(inputs=inputs, targets=targets, mask=mask, info={**info, "arrow": arrow})


def _sample_row(arrays: dict, cfg: Instructions, key: jax.Array) -> Prompt:
    i = jax.random.randint(key, (1,), 0, arrays["task"].shape[0])  # [1]: a scalar index takes a path without out_sharding
    row = {k: lookup(v, i)[0] for k, v in arrays.items()}  # sharded like the key (vmapped: over the data axis)
    return as_prompt(cfg, row["tokens"], row["arrow"], {k: row[k] for k in ("task", "x", "answer")})


def task_table(cfg: Instructions, rng: np.random.Generator) -> np.ndarray:
    """[K, n_inputs] answers: rows pairwise at Hamming distance >= min_task_distance, every column non-constant."""
    for _ in range(100):
        rows = []
        for _ in range(2000):
            row = rng.integers(0, cfg.n_outputs, cfg.n_inputs)
            if all(np.sum(row != r) >= cfg.min_task_distance for r in rows):
                rows.append(row)
                if len(rows) == cfg.n_tasks:
                    break
        table = np.array(rows)
        if len(rows) == cfg.n_tasks and all(len(set(table[:, i])) > 1 for i in range(cfg.n_inputs)):
            return table
    raise ConfigError(f"n_tasks={cfg.n_tasks} is too large: only {len(rows)} task functions over n_inputs="
                      f"{cfg.n_inputs} inputs with n_outputs={cfg.n_outputs} answers could be made that differ "
                      f"pairwise on min_task_distance={cfg.min_task_distance} inputs")


def generate_patterns(cfg: Instructions, rng: np.random.Generator) -> tuple[tuple[str, ...], ...]:
    """[K][M] patterns: a keyword per task inside 2 to 4 random atoms per family (see the module docstring).

    Raises ConfigError when a task gets fewer than n_families patterns that fit max_instruction_len.
    """
    alphabet, keywords = cfg.alphabet, []
    while len(keywords) < cfg.n_tasks:
        word = "".join(rng.choice(list(alphabet), cfg.keyword_len))
        if word not in keywords:
            keywords.append(word)
    patterns = []
    for word in keywords:
        families = []
        for _ in range(100 * cfg.n_families):
            atoms = []
            for _ in range(int(rng.integers(2, 5))):
                if rng.random() < 0.5:
                    atoms.append(str(rng.choice(list(alphabet))) + str(rng.choice(["", "?"])))
                else:
                    width = int(rng.integers(3, 7))
                    lo = int(rng.integers(0, max(len(alphabet) - width, 0) + 1))
                    hi = min(lo + width, len(alphabet)) - 1
                    atoms.append(f"[{alphabet[lo]}-{alphabet[hi]}]{rng.choice(QUANTIFIERS)}")
            atoms.insert(int(rng.integers(0, len(atoms) + 1)), word)
            text = "".join(atoms)
            capacity = pattern_capacity(parse_pattern(text, alphabet), cfg.max_instruction_len, cfg.max_repeat)
            if text not in families and capacity >= 5 * cfg.strings_per_family:
                families.append(text)
            if len(families) == cfg.n_families:
                break
        if len(families) < cfg.n_families:
            raise ConfigError(
                f"only {len(families)} of n_families={cfg.n_families} generated patterns for keyword {word!r} can "
                f"spell 5 x strings_per_family={5 * cfg.strings_per_family} strings of at most max_instruction_len="
                f"{cfg.max_instruction_len} letters (the keyword takes keyword_len={cfg.keyword_len}, at least two "
                f"more atoms the rest); raise max_instruction_len or lower strings_per_family or n_families")
        patterns.append(tuple(families))
    return tuple(patterns)


def build(cfg: Instructions) -> InstructionData:
    """The task table, the patterns and the three splits, generated on the host from cfg.seed.

    Raises ConfigError naming the pattern (patterns[k][m]) that cannot produce strings_per_family unambiguous
    strings, with the number it made, or naming unseen_families and every unseen family left without a string (a
    seen family of its task also spells each one it made): the unseen split, which keeps the others, would leave
    that family, and where it was its task's only one the whole task, out of its scores (at the defaults, seed 4
    lost task 9's).
    """
    rng = np.random.default_rng(cfg.seed)
    table = task_table(cfg, rng)
    patterns = cfg.patterns if cfg.patterns is not None else generate_patterns(cfg, rng)
    parsed = [[parse_pattern(p, cfg.alphabet, f"patterns[{k}][{m}]") for m, p in enumerate(fam)]
              for k, fam in enumerate(patterns)]
    compiled = [[re.compile(p) for p in fam] for fam in patterns]
    made, strings = set(), {}
    for k, fam in enumerate(parsed):
        others = [c for j, cs in enumerate(compiled) if j != k for c in cs]
        for m, atoms in enumerate(fam):
            found = []
            for _ in range(200 * cfg.strings_per_family):
                s = sample_string(atoms, rng, cfg.max_repeat)
                if (s and len(s) <= cfg.max_instruction_len and s not in made
                        and not any(c.fullmatch(s) for c in others)):
                    made.add(s)
                    found.append(s)
                    if len(found) == cfg.strings_per_family:
                        break
            if len(found) < cfg.strings_per_family:
                raise ConfigError(
                    f"patterns[{k}][{m}] ({patterns[k][m]!r}) made only {len(found)} unambiguous strings of at most "
                    f"max_instruction_len={cfg.max_instruction_len} letters (not matched by another task's patterns, "
                    f"not made before); strings_per_family={cfg.strings_per_family} are needed")
            strings[k, m] = found
    seen = cfg.n_families - cfg.unseen_families
    n_train = cfg.strings_per_family - cfg.validation_strings
    members, empty = {"train": [], "validation": [], "unseen": []}, []
    for (k, m), found in strings.items():
        if m >= seen:  # a string a seen family of its task also spells would test that family, not generalisation
            kept = [(k, m, s) for s in found if not any(c.fullmatch(s) for c in compiled[k][:seen])]
            members["unseen"] += kept
            if not kept:
                empty.append((k, m))
        else:
            members["train"] += [(k, m, s) for s in found[:n_train]]
            members["validation"] += [(k, m, s) for s in found[n_train:]]
    if empty:  # the unseen split's scores would leave these families (and maybe whole tasks) out, silently
        families = ", ".join(f"patterns[{k}][{m}] ({patterns[k][m]!r})" for k, m in empty)
        missing = sorted({k for k, _ in empty} - {k for k, _, _ in members["unseen"]})
        tasks = f", and tasks {missing} altogether" if missing else ""
        if cfg.patterns is not None:
            hint = "give unseen patterns that spell strings their task's seen ones do not"
        else:  # fewer letters, more patterns that share strings
            hint = "choose another seed" + (" or raise n_letters (patterns that share fewer strings)"
                                            if cfg.n_letters < len(string.ascii_lowercase) else "")
        raise ConfigError(f"unseen_families={cfg.unseen_families} left unseen families without a string: a seen family "
                          f"of the same task also spells each of the strings_per_family={cfg.strings_per_family} "
                          f"strings of {families}; the unseen split would miss them{tasks}; {hint}")
    splits = {name: _encode(cfg, table, rows) for name, rows in members.items()}
    return InstructionData(cfg, table, tuple(tuple(f) for f in patterns), splits)


def _encode(cfg: Instructions, table: np.ndarray, rows: list[tuple[int, int, str]]) -> Split:
    """Every (task, family, string) of rows with every input, as right-padded token sequences."""
    n = len(rows) * cfg.n_inputs
    tokens = np.full((n, cfg.seq_len), PAD, np.int32)
    instruction = np.zeros((n, cfg.seq_len), bool)
    task, family, x, answer, arrow = (np.zeros(n, np.int32) for _ in range(5))
    strings = []
    i = 0
    for k, m, s in rows:
        for xi in range(cfg.n_inputs):
            seq = [BOS, *(cfg.letter_token(c) for c in s), SEP, cfg.input_token(xi), ARROW,
                   cfg.answer_token(int(table[k, xi])), EOS]
            tokens[i, :len(seq)] = seq
            instruction[i, 1:1 + len(s)] = True
            task[i], family[i], x[i], arrow[i] = k, m, xi, len(s) + 3
            answer[i] = cfg.answer_token(int(table[k, xi]))
            strings.append(s)
            i += 1
    return Split(tokens, task, family, x, answer, arrow, instruction, tuple(strings))
