"""The global order of a training stream: the same examples in the same rows on any topology.

Epoch ``e`` visits the records in the permutation drawn from ``(seed, e)`` (or in stored order
without shuffling), cut into global batches of ``batch_size`` consecutive entries; with
``drop_remainder`` the short end of each epoch is left out. Every process loads only *its rows*
of each global batch, the positions its devices hold (:func:`check_rows`), so which example sits
in which row of which step depends on the seed, the data and the global batch size alone, never
on the number of processes or devices. A place in the stream is therefore the pair ``(epoch,
batch)``: a checkpoint written on one topology continues the same sequence on another.

A record that cannot be used is replaced, in its row, by a record drawn from that row's own
generator (:func:`replacement`): every process computes the same replacement without knowing what
the others loaded, and the number of batches in an epoch never depends on damage.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def permutation(seed: int, epoch: int, num_records: int, shuffle: bool = True) -> np.ndarray:
    """The record indices epoch ``epoch`` visits, in order."""
    if not shuffle:
        return np.arange(num_records)
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def batches_per_epoch(num_records: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Global batches in one epoch."""
    return num_records // batch_size if drop_remainder else -(-num_records // batch_size)


def check_rows(rows: Optional[Sequence[int]], batch_size: int) -> np.ndarray:
    """``rows`` (the positions within each global batch that one process loads, in the order of
    its part of the batch; None: every row) as an int array, checked."""
    if rows is None:
        return np.arange(batch_size)
    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.size == 0:
        raise ValueError("rows is empty: a process must load at least one row of each batch")
    if rows.min() < 0 or rows.max() >= batch_size:
        raise ValueError(f"rows {rows.min()}..{rows.max()} are not all within a global batch of {batch_size}")
    if np.unique(rows).size != rows.size:
        raise ValueError("rows repeats a position of the global batch")
    return rows


def replacement(seed: int, epoch: int, slot: int, attempt: int, num_records: int) -> int:
    """The record that stands in for the ``attempt``-th unusable record of ``slot`` (the position
    in the epoch's order): drawn from ``(seed, epoch, slot, attempt)``, so that any process
    computes it alone. (The draw ignores what else the batch holds: with ``N`` records, a batch of
    ``B`` holds a record twice with probability about ``B / N`` per replacement.)"""
    return int(np.random.default_rng([seed, epoch, slot, attempt, 1]).integers(num_records))
