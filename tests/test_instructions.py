"""The instruction-following task: unambiguous instructions, disjoint splits, a task table that makes the answer
depend on the instruction, the token layout, the on-device sampler, and errors that name the field."""

import dataclasses
import itertools
import re

import jax
import numpy as np
import pytest

from jaxicl.tasks import instructions as ins
from jaxicl.tasks import sample_batch
from jaxicl.train import data_mesh
from jaxicl.validation import ConfigError

CFG = ins.Instructions(n_tasks=6, n_families=4, strings_per_family=10, validation_strings=3)


@pytest.fixture(scope="module")
def data():
    return ins.build(CFG)


def test_instructions_are_unambiguous_across_tasks_and_match_their_own_family(data):
    compiled = [[re.compile(p) for p in fam] for fam in data.patterns]
    for split in data.splits.values():
        for s, k, m in zip(split.strings, split.task, split.family):
            assert compiled[k][m].fullmatch(s)
            assert not any(c.fullmatch(s) for j, cs in enumerate(compiled) if j != k for c in cs)
            assert 0 < len(s) <= CFG.max_instruction_len


def test_splits_are_disjoint_and_hold_the_promised_families_and_counts(data):
    strings = {name: set(s.strings) for name, s in data.splits.items()}
    for a, b in itertools.combinations(strings, 2):
        assert not strings[a] & strings[b], (a, b)
    seen = CFG.n_families - CFG.unseen_families
    assert set(data.splits["train"].family) == set(data.splits["validation"].family) == set(range(seen))
    assert set(data.splits["unseen"].family) == set(range(seen, CFG.n_families))
    per_task = {"train": seen * (CFG.strings_per_family - CFG.validation_strings),
                "validation": seen * CFG.validation_strings, "unseen": CFG.unseen_families * CFG.strings_per_family}
    for name, split in data.splits.items():
        # every string with every input, once
        assert len(set(zip(split.strings, split.x))) == len(split) == len(set(split.strings)) * CFG.n_inputs
        if name != "unseen":
            np.testing.assert_array_equal(np.bincount(split.task), CFG.n_tasks * [per_task[name] * CFG.n_inputs])
    # an unseen family's strings are those its sampler made that no seen family of the same task also spells
    compiled = [[re.compile(p) for p in fam] for fam in data.patterns]
    unseen = data.splits["unseen"]
    assert not any(c.fullmatch(s) for s, k in zip(unseen.strings, unseen.task) for c in compiled[k][:seen])
    assert set(zip(unseen.task.tolist(), unseen.family.tolist())) == set(itertools.product(  # each kept one at least
        range(CFG.n_tasks), range(seen, CFG.n_families)))
    made = CFG.n_tasks * per_task["unseen"]
    assert 0.9 * made <= len(set(unseen.strings)) <= made


def test_the_task_table_makes_the_answer_depend_on_the_instruction(data):
    t = data.table
    assert t.shape == (CFG.n_tasks, CFG.n_inputs) and t.min() >= 0 and t.max() < CFG.n_outputs
    for a, b in itertools.combinations(range(CFG.n_tasks), 2):
        assert np.sum(t[a] != t[b]) >= CFG.min_task_distance
    for x in range(CFG.n_inputs):  # no input alone determines the answer
        assert len(set(t[:, x])) > 1
    # the tightest settings: all 4 rows of {0, 1}^2 are pairwise at distance >= 1; two tasks over 5 binary inputs
    # with no constant column are complements
    tight = ins.task_table(ins.Instructions(n_tasks=4, n_inputs=2, n_outputs=2, min_task_distance=1),
                           np.random.default_rng(0))
    assert sorted(map(tuple, tight.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for seed in range(5):
        pair = ins.task_table(ins.Instructions(n_tasks=2, n_inputs=5, n_outputs=2, min_task_distance=1),
                              np.random.default_rng(seed))
        np.testing.assert_array_equal(pair[0], 1 - pair[1])


def test_sequences_decode_to_instruction_input_and_answer(data):
    split = data.splits["validation"]
    for i in range(0, len(split), 7):
        seq = split.tokens[i]
        s, k, x = split.strings[i], split.task[i], split.x[i]
        want = [ins.BOS, *(CFG.letter_token(c) for c in s), ins.SEP, CFG.input_token(x), ins.ARROW,
                CFG.answer_token(data.table[k, x]), ins.EOS]
        np.testing.assert_array_equal(seq[:len(want)], want)
        assert np.all(seq[len(want):] == ins.PAD) and seq[split.arrow[i]] == ins.ARROW
        assert split.answer[i] == CFG.answer_token(data.table[k, x])
        np.testing.assert_array_equal(np.flatnonzero(split.instruction_mask[i]), np.arange(1, 1 + len(s)))


def test_the_device_sampler_draws_table_rows_with_the_answer_mask(data):
    for loss in ins.LOSSES:
        cfg = ins.Instructions(**{**CFG.__dict__, "loss": loss})
        d = ins.build(cfg)
        assert d.sampler("train") is d.sampler("train")  # one function: jitted callers compile once
        batch = sample_batch(d.sampler("train"), cfg, jax.random.key(0), 64, axis=None)
        split = d.splits["train"]
        rows = {tuple(r) for r in split.tokens[:, :-1]}
        inputs, targets, mask = (np.asarray(v) for v in (batch.inputs, batch.targets, batch.mask))
        assert all(tuple(r) in rows for r in inputs)
        arrow = np.asarray(batch.info["arrow"])
        np.testing.assert_array_equal(inputs[np.arange(64), arrow], ins.ARROW)
        np.testing.assert_array_equal(targets[np.arange(64), arrow], np.asarray(batch.info["answer"]))
        if loss == "answer":
            np.testing.assert_array_equal(mask, np.arange(mask.shape[1])[None] == arrow[:, None])
        else:
            np.testing.assert_array_equal(mask, targets != ins.PAD)
        assert len({tuple(r) for r in inputs}) > 32  # uniform draws from 2000+ rows rarely repeat


def test_a_key_made_before_the_mesh_was_set_draws_the_batch_it_draws_without_a_mesh(data):
    """The sampler draws its row index straight from the prompt key: traced on a key made outside jax.set_mesh (the
    empty mesh), it could not be vmapped over keys split on "data" (ValueError: Resource axis: data ... not found)."""
    key = jax.random.key(3)
    want = sample_batch(data.sampler("train"), CFG, key, 8)
    with jax.set_mesh(data_mesh(4)):
        b = sample_batch(data.sampler("train"), CFG, key, 8)
    assert b.inputs.sharding.spec[0] == "data"
    for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)  # integer draws from the same threefry bits


def test_parsed_patterns_sample_strings_that_re_matches_and_count_them():
    rng = np.random.default_rng(0)
    alphabet = "abcd"
    for text in ("a[bc]{1,2}d?", "[a-c]+d", "b.?a*", "[ad]{2}c"):
        atoms = ins.parse_pattern(text, alphabet)
        for _ in range(50):
            assert re.fullmatch(text, ins.sample_string(atoms, rng, max_repeat=3))
    # a pattern whose atoms split every string one way: the capacity is the number of strings re matches
    assert ins.parse_pattern("[b-d]a{2,3}.", alphabet) == (ins.Atom("bcd", 1, 1), ins.Atom("a", 2, 3),
                                                           ins.Atom(alphabet, 1, 1))  # ranges include both ends
    for text, max_len in (("a[bc]{1,2}d?", 5), ("[ab]c?[cd]{2}", 4), ("[b-d]a?", 2)):
        brute = sum(bool(re.fullmatch(text, "".join(s))) for n in range(max_len + 1)
                    for s in itertools.product(alphabet, repeat=n))
        assert ins.pattern_capacity(ins.parse_pattern(text, alphabet), max_len, 3) == brute


@pytest.mark.parametrize("text,message,position", [
    ("ab[cd", "unclosed '\\['", 2), ("+ab", "without an atom", 0), ("a{3,1}", "needs 0 <= m <= n", 1),
    ("a{x}", "malformed repetition", 1), ("az", "letter 'z' is not in the alphabet", 1), ("[d-a]", "empty range", 1),
    # inside a class the position is the letter's (it was the '[''s)
    ("a[a-cz]", "letter 'z' is not in the alphabet", 5), ("[a x]", "letter ' ' is not in the alphabet", 2),
    ("b[a-z]", "letter 'z' is not in the alphabet", 4),
])
def test_pattern_syntax_errors_name_the_field_and_position(text, message, position):
    cfg = ins.Instructions(n_tasks=2, n_families=2, n_letters=4, patterns=(("ab", text), ("cd", "dc")))
    with pytest.raises(ConfigError, match=rf"patterns\[0\]\[1\]: .*{message}.* at position {position} of"):
        ins.build(cfg)


def test_impossible_settings_fail_at_setup_with_the_field_and_the_count():
    with pytest.raises(ConfigError, match=r"n_tasks=30 is too large for the alphabet: n_letters=5 makes only 25"):
        ins.Instructions(n_tasks=30, n_letters=5)
    with pytest.raises(ConfigError, match=r"n_tasks=9 is too large: only \d task functions"):
        ins.build(ins.Instructions(n_tasks=9, n_inputs=2, n_outputs=2, min_task_distance=1))
    few = ins.Instructions(n_tasks=2, n_families=2, strings_per_family=5, validation_strings=1,
                           patterns=(("ab", "a[bc]"), ("cd", "c[de]")))
    with pytest.raises(ConfigError, match=r"patterns\[0\]\[0\] \('ab'\) made only 1 unambiguous strings.*"
                                          r"strings_per_family=5"):
        ins.build(few)
    # a keyword of 2 letters and at least two more atoms leave no room in 3 letters for 100 strings per family
    with pytest.raises(ConfigError, match=r"only 0 of n_families=5 generated patterns .* strings_per_family=100 "
                                          r"strings of at most max_instruction_len=3 .*keyword_len=2"):
        ins.build(ins.Instructions(max_instruction_len=3))
    with pytest.raises(ConfigError, match="patterns must hold n_families=3"):
        ins.Instructions(n_tasks=2, n_families=3, patterns=(("a", "b"), ("c", "d")))
    with pytest.raises(ConfigError, match="loss must be one of"):
        ins.Instructions(loss="every")


def test_strings_another_task_spells_are_rejected_in_both_directions_and_only_whole_strings_count():
    """Each family spells 3 or 1 strings and the other task's patterns spell all but one of them, so every family's
    string is determined; "cc" stays: task 1's "c" spells a prefix of it, not it."""
    for seed in range(3):
        cfg = ins.Instructions(n_tasks=2, n_families=3, unseen_families=0, strings_per_family=1, validation_strings=0,
                               n_letters=3, patterns=(("a[abc]", "b[abc]", "cc"), ("[abc]a", "[abc]b", "c")), seed=seed)
        train = ins.build(cfg).splits["train"]
        got = {(int(k), int(m), s) for k, m, s in zip(train.task, train.family, train.strings)}
        assert got == {(0, 0, "ac"), (0, 1, "bc"), (0, 2, "cc"), (1, 0, "ca"), (1, 1, "cb"), (1, 2, "c")}


def test_an_unseen_family_left_without_a_string_fails_at_build_naming_it_and_unseen_families():
    """Unseen strings a seen family of their task also spells are dropped; where that left a family none, build
    returned an unseen split without it: with it the whole task where it was the task's only unseen family (the
    defaults at seed 4 lost task 9, so the unseen accuracy was over 9 tasks), and an empty split where every family
    lost its strings (clustering_dynamics then failed with a ZeroDivisionError after training)."""
    with pytest.raises(ConfigError, match=re.escape(
            "unseen_families=1 left unseen families without a string: a seen family of the same task also spells "
            "each of the strings_per_family=20 strings of patterns[9][4] ('[p-t]{1,3}e?jf'); the unseen split would "
            "miss them, and tasks [9] altogether; choose another seed") + "$"):  # n_letters=26: no more letters
        ins.build(ins.Instructions(seed=4))
    generated = ins.Instructions(n_tasks=2, n_families=2, unseen_families=1, strings_per_family=3,
                                 validation_strings=1, n_letters=3, n_inputs=2, n_outputs=2, min_task_distance=1,
                                 keyword_len=1, max_instruction_len=6, seed=33)
    with pytest.raises(ConfigError, match=r"unseen_families=1 left .* of patterns\[0\]\[1\] .*, patterns\[1\]\[1\] "
                                          r".*tasks \[0, 1\] altogether; choose another seed or raise n_letters"):
        ins.build(generated)
    # given patterns: an unseen family that is a seen family's pattern makes one string that differs from the seen
    # one (no repeats), which the seen pattern spells, for every seed; "e[ef]" and "b[bc]" keep theirs
    given = ins.Instructions(n_tasks=2, n_families=2, unseen_families=1, strings_per_family=1, validation_strings=0,
                             n_letters=6, n_inputs=2, n_outputs=2, min_task_distance=1)
    hint = "; give unseen patterns that spell strings their task's seen ones do not"
    cases = [(given, (("a[bc]", "a[bc]"), ("d[ef]", "d[ef]")),
              "patterns[0][1] ('a[bc]'), patterns[1][1] ('d[ef]'); the unseen split would miss them, and tasks [0, 1] "
              "altogether"),
             (given, (("a[bc]", "a[bc]"), ("d[ef]", "e[ef]")),
              "patterns[0][1] ('a[bc]'); the unseen split would miss them, and tasks [0] altogether"),
             (dataclasses.replace(given, n_families=3, unseen_families=2),  # task 0 keeps its other unseen family
              (("a[bc]", "a[bc]", "b[bc]"), ("d[ef]", "e[ef]", "f[ef]")),
              "patterns[0][1] ('a[bc]'); the unseen split would miss them")]
    for cfg, patterns, names in cases:
        for seed in range(3):
            with pytest.raises(ConfigError, match=re.escape(
                    f"unseen_families={cfg.unseen_families} left unseen families without a string: a seen family of "
                    f"the same task also spells each of the strings_per_family=1 strings of {names}{hint}") + "$"):
                ins.build(dataclasses.replace(cfg, patterns=patterns, seed=seed))
    # the split a config leaves empty: the sampler names the field that does
    data = ins.build(dataclasses.replace(given, patterns=(("a[bc]", "b[bc]"), ("d[ef]", "e[ef]")), unseen_families=0))
    assert len(data.splits["train"]) == 2 * 2 * 2  # tasks x seen families x inputs
    for split, field in (("validation", "validation_strings"), ("unseen", "unseen_families")):
        with pytest.raises(ConfigError, match=rf"the {split} split is empty: {field}=0$"):
            data.sampler(split)


def test_the_device_sampler_reaches_every_row_of_a_split(data):
    split = data.splits["validation"]  # 270 rows, 8192 draws: a row's count is Poisson(30)
    batch = sample_batch(data.sampler("validation"), CFG, jax.random.key(3), 8192, axis=None)
    drawn = {tuple(r) for r in np.asarray(batch.inputs)}
    assert drawn == {tuple(r) for r in split.tokens[:, :-1]}
