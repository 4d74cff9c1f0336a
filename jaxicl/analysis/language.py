"""Reading a discrete message: word usage per slot against labelled attributes, mutual information, word swaps.

A message is L word ids (slots) per example, e.g. what LEA's speech stream says about a board
(jaxicl.models.lea). Everything here is numpy on the host: the messages of a few thousand boards are small.
"""

import numpy as np

from jaxicl.analysis.clustering import check_indices


def usage_table(words: np.ndarray, labels: np.ndarray, n_labels: int, n_words: int) -> np.ndarray:
    """[L, n_labels, n_words] how often each word fills each slot, per label: words [N, L] in [0, n_words), labels [N]
    in [0, n_labels) (a label -1, "none", would be counted as the last label)."""
    check_indices("words", words, 0, n_words)
    check_indices("labels", labels, 0, n_labels)
    n, slots = words.shape
    table = np.zeros((slots, n_labels, n_words), np.int64)
    np.add.at(table, (np.broadcast_to(np.arange(slots), (n, slots)), labels[:, None], words), 1)
    return table


def mutual_information(words: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[L] the plug-in mutual information (bits) between each slot's word and the label: words [N, L], labels [N]."""
    _, lab = np.unique(labels, return_inverse=True)
    out = np.zeros(words.shape[1])
    for slot in range(words.shape[1]):
        _, w = np.unique(words[:, slot], return_inverse=True)
        joint = np.zeros((w.max() + 1, lab.max() + 1))
        np.add.at(joint, (w, lab), 1)
        joint /= joint.sum()
        outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
        nz = joint > 0
        out[slot] = np.sum(joint[nz] * np.log2(joint[nz] / outer[nz]))
    return out


def shuffled_mutual_information(words: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                                rounds: int = 5) -> np.ndarray:
    """[L] the mean mutual information with randomly permuted labels: the plug-in estimate's bias at this N."""
    return np.mean([mutual_information(words, rng.permutation(labels)) for _ in range(rounds)], 0)


def label_words(table: np.ndarray) -> np.ndarray:
    """[n_labels, L] each label's most frequent word in each slot (table from usage_table)."""
    return np.argmax(table, -1).T


def swap_words(words: np.ndarray, target: np.ndarray, slots: np.ndarray, table: np.ndarray) -> np.ndarray:
    """words [N, L] with the given slots set to the target label's [N] most frequent word there (usage_table)."""
    check_indices("target", target, 0, table.shape[1])
    out = words.copy()
    out[:, slots] = label_words(table)[target][:, slots]
    return out


def random_words(words: np.ndarray, n_slots: int, table: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The control edit: words [N, L] with n_slots slots per row (chosen uniformly) set to a word drawn uniformly
    from the words that ever fill that slot in the table."""
    out = words.copy()
    used = [np.flatnonzero(table[s].sum(0)) for s in range(words.shape[1])]
    for i in range(len(words)):
        for s in rng.choice(words.shape[1], n_slots, replace=False):
            out[i, s] = rng.choice(used[s])
    return out
