"""Parallel text for AltCLIP's phase 1 (teacher learning), and bilingual image-caption sources for phase 2.

Phase 1 regresses the student's embedding of sentence B onto the frozen teacher's embedding of
sentence A, where A is English (the teacher's language) and B is A itself or its translation. The
identical-language pairs are not optional: without them the AltCLIP paper's ImageNet-EN accuracy
falls from 53.8 to 15.5. :func:`expand_pairs` turns translation pairs (en, other) into the training
pairs (en, en) and (en, other).

Sources of translation pairs: the scenes dataset (``caption_en``, ``caption_zh`` of each
example, :func:`scenes_pairs`), TSV files (``english<TAB>translation`` per line) and JSONL files
(one object per line with the two texts under configurable keys), :func:`read_pairs`.
:class:`ParallelTextPipeline` batches the pairs deterministically and resumably, with the same
state keys (``epoch``, ``batch``, ``skipped``) as :class:`altjax.data.InputPipeline`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np

from altjax.data import order as orders
from altjax.data import scenes
from altjax.data.preprocess import TextField, tokenize
from altjax.data.sources import get_field

# Batch key telling, per row, whether the student reads the teacher's sentence itself (1) or its translation (0).
SAME_LANGUAGE = "same_language"

log = logging.getLogger("altjax.data")


def expand_pairs(translations: Sequence[tuple[str, str]], *, same_language: bool = True) -> list[tuple[str, str, int]]:
    """``(teacher text, student text, same language)`` training pairs of translation pairs
    ``(english, other)``: ``(en, other, 0)`` for each, and ``(en, en, 1)`` with ``same_language``."""
    out = [(en, other, 0) for en, other in translations]
    if same_language:
        out += [(en, en, 1) for en, _ in translations]
    return out


def scenes_pairs(split: str = "train", *, data_dir: str | None = None, config=None) -> list[tuple[str, str]]:
    """``(caption_en, caption_zh)`` of every example of a scenes split (preparing it if needed),
    in generation order; the images are not decoded."""
    import tensorflow_datasets as tfds  # not at the top: only reading the scenes dataset needs it

    builder = scenes.prepare(config if config is not None else scenes.scenes_config(), data_dir=data_dir)
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    records = sorted(source.__getitems__(list(range(len(source)))), key=lambda r: r["index"])
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
    return [(text(r["caption_en"]), text(r["caption_zh"])) for r in records]


def read_pairs(path: str, *, source_key: str = "en", target_key: str = "zh") -> list[tuple[str, str]]:
    """Translation pairs of a ``.tsv`` file (``english<TAB>translation``, blank lines skipped) or a
    ``.jsonl`` file (objects with the English text under ``source_key``, the other under ``target_key``)."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                record = json.loads(line)
                pairs.append((str(record[source_key]), str(record[target_key])))
            else:
                columns = line.rstrip("\n").split("\t")
                if len(columns) != 2:
                    raise ValueError(f"{path}:{number}: expected 'english<TAB>translation', got {len(columns)} columns")
                pairs.append((columns[0], columns[1]))
    if not pairs:
        raise ValueError(f"{path}: no sentence pairs")
    return pairs


class ParallelTextPipeline(Iterator[dict[str, np.ndarray]]):
    """This process's rows of every global batch: ``teacher_*`` and ``student_*`` token arrays
    (``input_ids``, ``attention_mask``), and :data:`SAME_LANGUAGE` (int32), from ``pairs`` of
    :func:`expand_pairs`.

    The order is global (:mod:`altjax.data.order`): each epoch visits the pairs in a new
    permutation of ``[seed, epoch]`` cut into global batches of ``batch_size`` (the short end of an
    epoch is dropped), and this process takes its ``rows`` of each (None: all of them), so the
    batches do not depend on the number of processes. ``get_state`` / ``set_state`` give exact
    resume, on any topology.

    Pairs with an empty or whitespace-only text are skipped, counted in ``skipped_pairs`` and
    logged as a warning on the ``altjax.data`` logger (as the image-text pipeline skips records
    with an empty caption).
    """

    def __init__(self, pairs: Sequence[tuple[str, str, int]], *, batch_size: int, teacher: TextField,
                 student: TextField, seed: int = 0, rows: Sequence[int] | None = None):
        usable = [p for p in pairs if str(p[0]).strip() and str(p[1]).strip()]
        self.skipped_pairs = len(pairs) - len(usable)
        if self.skipped_pairs:
            first = next(p for p in pairs if not (str(p[0]).strip() and str(p[1]).strip()))
            log.warning("skipped %d of %d sentence pairs with an empty or whitespace-only text (the first: %r)",
                        self.skipped_pairs, len(pairs), tuple(first[:2]))
        pairs = usable
        if len(pairs) < batch_size:
            raise ValueError(f"{len(pairs)} pairs cannot give one batch of {batch_size}")
        self.pairs = list(pairs)
        self.batch_size, self.seed = batch_size, int(seed)
        self.rows = orders.check_rows(rows, batch_size)
        self.batches_per_epoch = orders.batches_per_epoch(len(self.pairs), batch_size)
        self.teacher = TextField(teacher.tokenizer, max_length=teacher.max_length, prefix="teacher_")
        self.student = TextField(student.tokenizer, max_length=student.max_length, prefix="student_")
        self._state = {"epoch": 0, "batch": 0, "skipped": 0}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The pair indices of ``epoch``'s global order (every process's)."""
        return orders.permutation(self.seed, epoch, len(self.pairs))

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, batch = self._state["epoch"], self._state["batch"]
        order = self.epoch_order(epoch)
        rows = [self.pairs[i] for i in order[batch * self.batch_size + self.rows]]
        tokens = {**tokenize([r[0] for r in rows], self.teacher), **tokenize([r[1] for r in rows], self.student),
                  SAME_LANGUAGE: np.asarray([r[2] for r in rows], np.int32)}
        batch += 1
        self._state = {"epoch": epoch + 1, "batch": 0, "skipped": 0} if batch == self.batches_per_epoch else \
            {"epoch": epoch, "batch": batch, "skipped": 0}
        return tokens

    def __iter__(self) -> "ParallelTextPipeline":
        return self

    @property
    def epoch(self) -> int:
        """The epoch of the next batch's first pair."""
        return self._state["epoch"]

    def get_state(self) -> dict[str, int]:
        """The cursor after the last batch returned (``epoch``, ``batch``: global batches of the
        epoch consumed), with what the stream depends on (``seed``, ``batch_size``, ``num_records``)."""
        return {**self._state, "seed": self.seed, "batch_size": self.batch_size, "num_records": len(self.pairs)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a cursor of :meth:`get_state` (of the same pairs, seed and global batch
        size, with any rows; anything else raises)."""
        mine = self.get_state()
        for key in ("seed", "batch_size", "num_records"):
            if key not in state or int(state[key]) != mine[key]:
                raise ValueError(f"the state was saved with {key}={state.get(key)}, this pipeline has "
                                 f"{key}={mine[key]}: it would not continue the same sequence")
        self._state = {"epoch": int(state["epoch"]), "batch": int(state["batch"]), "skipped": 0}

    def close(self) -> None:
        """Nothing runs in the background; for the trainer's interface."""


class MultilingualCaptions:
    """An image-text source whose caption field ``"caption"`` holds the captions of every field in
    ``caption_keys`` (one per language, e.g. scenes' ``caption_en``/``caption_zh`` or a
    WebDataset's ``en.txt``/``zh.txt``), so that the pipeline draws one of them per example and
    epoch (phase 2 trains on both languages). Other fields pass through."""

    caption_key = "caption"

    def __init__(self, source, caption_keys: Sequence[str]):
        if not caption_keys:
            raise ValueError("MultilingualCaptions needs at least one caption field")
        self.source, self.caption_keys = source, tuple(caption_keys)
        self.image_key = source.image_key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = dict(self.source[index])
        record["caption"] = [get_field(record, key) for key in self.caption_keys]
        return record

    def describe(self, index: int) -> str:
        """Where record ``index`` comes from (for warnings)."""
        return self.source.describe(index)


def pairs_from_config(data) -> list[tuple[str, str, int]]:
    """The training pairs of a phase-1 ``config.data``: ``source`` "scenes" (the ``split`` of the
    scenes dataset) or "files" (``files``, comma-separated TSV/JSONL paths); identical-language
    pairs when ``same_language_pairs``."""
    if data.source == "scenes":
        translations = scenes_pairs(data.split, data_dir=data.data_dir or None, config=scenes.scenes_config(**data.scenes))
    elif data.source == "files":
        translations = []
        for path in [p for p in data.files.split(",") if p]:
            translations += read_pairs(os.path.expanduser(path), source_key=data.source_key, target_key=data.target_key)
    else:
        raise ValueError(f"unknown parallel data.source {data.source!r}: scenes or files")
    return expand_pairs(translations, same_language=bool(data.same_language_pairs))
