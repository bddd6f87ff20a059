"""The input pipeline: a deterministic, resumable iterator of preprocessed, tokenised batches.

Order. The stream is global (:mod:`altjax.data.order`): epoch ``e`` visits the records in the
permutation drawn from ``(seed, e)`` (or in order without ``shuffle``), cut into global batches of
``batch_size``; a process loads only its ``rows`` of each global batch. Every random choice for a
record (crop, which of its captions) comes from a generator seeded with ``(seed, epoch, record
index)``. So the batches depend on the seed, the data and the global batch size alone: not on
threads, timing, prefetching, or the number of processes and devices reading them.

Resume. The iterator's position is ``(epoch, batch)``: the epoch and how many of its global batches
were consumed. :meth:`InputPipeline.get_state` returns it (with the seed, the global batch size,
the record count and the skip count) as a small JSON-serialisable dict, for the training
checkpoint; :meth:`InputPipeline.set_state` on a fresh pipeline over the same data, with any
``rows``, continues with exactly the global batches the first one would have produced next.

Damage. A record that cannot be read or decoded, or whose caption is empty or whitespace only, is
skipped: counted in :attr:`InputPipeline.skipped` (and in the state) and logged as a warning on
the ``altjax.data`` logger; its row takes a record drawn for that row alone
(:func:`altjax.data.order.replacement`), so that every process agrees on the batch without
knowing what the others loaded. (Of a list of captions, the empty ones are never drawn; the record
is skipped when all are empty.) Skipping is deterministic (the same records fail every time), so
resume stays exact. A run of ``max_consecutive_failures`` failures in a row means a wrong key or a
broken setup, not damaged data, and raises.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from altjax.data import order as orders
from altjax.data.preprocess import (EmptyCaptionError, ImageTransform, TextField, choose_caption, decode_image,
                                    tokenize)
from altjax.data.sources import get_field

log = logging.getLogger("altjax.data")

_STATE_KEYS = ("epoch", "batch", "skipped", "seed", "batch_size", "num_records")
_END = object()


class _Failure:
    """A record that could not be read, decoded or transformed."""

    def __init__(self, index: int, error: BaseException):
        self.index, self.error = index, error


class InputPipeline(Iterator[dict[str, np.ndarray]]):
    """This process's rows of every global batch: ``pixel_values`` float32 (R, H, W, 3),
    ``input_ids``/``attention_mask`` (/``token_type_ids``) int32 (R, L) per text field, and the
    ``extra_keys`` fields (e.g. the scenes' ``label``), read from ``source`` (see
    :mod:`altjax.data.sources`); R is the number of ``rows``.

    Args:
      source: a random-access source (``len``, ``[i]`` -> dict of fields, ``describe(i)``).
      batch_size: the global batch size (examples per step over all processes).
      rows: the positions within each global batch that this process loads, in the order of its
        part of the batch (the trainer's :func:`altjax.training.step.process_batch_positions`);
        None: every row (one process).
      image: the image transform (e.g. ``ImageTransform(align_image_config(289), "random_crop")``).
      texts: one :class:`TextField` or several (parallel texts, each with its own output prefix).
      image_key: the image field; None takes ``source.image_key``.
      extra_keys: fields copied into the batch as arrays.
      seed: the seed of the order and of every random choice.
      shuffle: visit the records of each epoch in a random order.
      num_epochs: stop after this many epochs; None repeats forever.
      drop_remainder: leave out the short end of each epoch; when False it is returned as a short
        batch (only when this process loads every row).
      num_threads: threads decoding and transforming examples.
      prefetch: batches prepared ahead in a background thread (0: prepared on demand).
      max_consecutive_failures: raise when this many records in a row fail.
    """

    def __init__(self, source, *, batch_size: int, image: ImageTransform, texts: TextField | Sequence[TextField],
                 rows: Sequence[int] | None = None, image_key: str | None = None, extra_keys: Sequence[str] = (),
                 seed: int = 0, shuffle: bool = True, num_epochs: int | None = None, drop_remainder: bool = True,
                 num_threads: int | None = None, prefetch: int = 2, max_consecutive_failures: int = 1000):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.rows = orders.check_rows(rows, batch_size)
        if not drop_remainder and self.rows.size != batch_size:
            raise ValueError("drop_remainder=False needs a pipeline that loads every row of the batch (rows=None)")
        self.source = source
        self.batch_size = batch_size
        self.image = image
        self.texts = (texts,) if isinstance(texts, TextField) else tuple(texts)
        if not self.texts:
            raise ValueError("give at least one text field")
        self.image_key = image_key or source.image_key
        self.text_keys = tuple(f.key or source.caption_key for f in self.texts)
        self.extra_keys = tuple(extra_keys)
        self.seed, self.shuffle, self.num_epochs = int(seed), shuffle, num_epochs
        self.drop_remainder = drop_remainder
        self.num_records = len(source)
        if self.num_records < (batch_size if drop_remainder else 1):
            raise ValueError(f"{self.num_records} records cannot give one batch of {batch_size}")
        self.batches_per_epoch = orders.batches_per_epoch(self.num_records, batch_size, drop_remainder)
        self.max_consecutive_failures = max_consecutive_failures
        self.prefetch = prefetch
        self._pool = concurrent.futures.ThreadPoolExecutor(num_threads or min(4, os.cpu_count() or 1),
                                                           thread_name_prefix="altjax-data")
        self._order_cache: tuple[int, np.ndarray] | None = None
        # The consumer's view: the state after the last batch returned by __next__.
        self._state = {"epoch": 0, "batch": 0, "skipped": 0}
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._generator: Iterator | None = None  # the batches when prefetch is 0

    # ----- order -----

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The record indices of ``epoch``'s global order (every process's)."""
        cached = self._order_cache  # read once: the prefetch thread may replace it meanwhile
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = orders.permutation(self.seed, epoch, self.num_records, self.shuffle)
        self._order_cache = (epoch, order)
        return order

    # ----- per example -----

    def _load(self, index: int, epoch: int):
        try:
            rng = np.random.default_rng([self.seed, epoch, int(index)])
            record = self.source[int(index)]
            pixels = self.image(decode_image(get_field(record, self.image_key)), rng)
            captions = [choose_caption(get_field(record, key), rng) for key in self.text_keys]
            extras = [np.asarray(get_field(record, key)) for key in self.extra_keys]
            return pixels, captions, extras
        except Exception as error:  # noqa: BLE001 - any failure of one record is damage to skip
            return _Failure(int(index), error)

    def _warn(self, failure: _Failure, skipped: int) -> None:
        # Every failure of the first ten, then every hundredth: a damaged shard must not flood the log.
        if skipped <= 10 or skipped % 100 == 0:
            what = "with an empty caption" if isinstance(failure.error, EmptyCaptionError) else "unreadable"
            log.warning("skipped %s record %s (%s: %s); %d skipped so far", what,
                        self.source.describe(failure.index), type(failure.error).__name__, failure.error, skipped)

    # ----- batches -----

    def _batches(self, epoch: int, batch: int, skipped: int):
        """Yields (this process's rows of a batch, state after it) from the given cursor."""
        consecutive = 0
        while self.num_epochs is None or epoch < self.num_epochs:
            order = self.epoch_order(epoch)
            while batch < self.batches_per_epoch:
                start = batch * self.batch_size
                size = min(self.batch_size, self.num_records - start)
                slots = start + self.rows[self.rows < size]
                examples = []
                for slot, result in zip(slots, self._pool.map(self._load, order[slots], [epoch] * len(slots))):
                    attempt = 0
                    while isinstance(result, _Failure):
                        skipped += 1
                        consecutive += 1
                        self._warn(result, skipped)
                        if consecutive >= self.max_consecutive_failures:
                            raise RuntimeError(
                                f"{consecutive} records in a row failed, the last "
                                f"{self.source.describe(result.index)}: {type(result.error).__name__}: "
                                f"{result.error}. Check the image/caption keys and the transform.") from result.error
                        attempt += 1
                        result = self._load(orders.replacement(self.seed, epoch, int(slot), attempt,
                                                               self.num_records), epoch)
                    consecutive = 0
                    examples.append(result)
                batch += 1
                after = (epoch + 1, 0) if batch == self.batches_per_epoch else (epoch, batch)
                yield self._collate(examples), {"epoch": after[0], "batch": after[1], "skipped": skipped}
            epoch, batch = epoch + 1, 0
        yield None, {"epoch": epoch, "batch": batch, "skipped": skipped}

    def _collate(self, examples) -> dict[str, np.ndarray]:
        batch = {"pixel_values": np.stack([e[0] for e in examples])}
        for i, field in enumerate(self.texts):
            batch.update(tokenize([e[1][i] for e in examples], field))
        for i, key in enumerate(self.extra_keys):
            values = np.stack([e[2][i] for e in examples])
            # JAX computes in 32 bits by default: 64-bit ints and floats are narrowed here, once.
            if values.dtype == np.int64:
                values = values.astype(np.int32)
            elif values.dtype == np.float64:
                values = values.astype(np.float32)
            batch[key] = values
        return batch

    # ----- prefetching -----

    def _produce(self, out: queue.Queue, stop: threading.Event, start: dict[str, int]) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for item in self._batches(start["epoch"], start["batch"], start["skipped"]):
                if not put(item):
                    return
            put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            put(error)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, self.prefetch))
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop, dict(self._state)),
                                        name="altjax-data-prefetch", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None
        self._generator = None

    def __next__(self) -> dict[str, np.ndarray]:
        if self.prefetch <= 0:
            if self._generator is None:
                self._generator = self._batches(self._state["epoch"], self._state["batch"],
                                                self._state["skipped"])
            item = next(self._generator, _END)
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
        if item is _END:
            self._halt()
            raise StopIteration
        if isinstance(item, BaseException):
            self._halt()
            raise item
        batch, state = item
        self._state = state
        if batch is None:  # the data ended; the state counts every record read
            self._halt()
            raise StopIteration
        return batch

    def __iter__(self) -> "InputPipeline":
        return self

    # ----- state -----

    @property
    def skipped(self) -> int:
        """Records skipped so far, as unreadable or for an empty caption (in the batches returned,
        since the run started)."""
        return self._state["skipped"]

    @property
    def damaged(self) -> list[str]:
        """Damage the source found while indexing its files (e.g. a truncated tar), whose records
        after the damage are lost; also logged as warnings."""
        return list(getattr(self.source, "damaged", []))

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._state["epoch"]

    def get_state(self) -> dict[str, int]:
        """The position after the last batch returned, as a JSON-serialisable dict: ``epoch``,
        ``batch`` (global batches of the epoch consumed), ``skipped`` (records this pipeline
        skipped, plus what the state it continues carried), and what the stream depends on
        (``seed``, ``batch_size``, ``num_records``)."""
        return {**self._state, "seed": self.seed, "batch_size": self.batch_size, "num_records": self.num_records}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a state of :meth:`get_state`, of a pipeline over the same data, seed and
        global batch size, with any rows (anything else could not continue the same sequence and
        raises)."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"not an input pipeline state (missing {missing}): {state}")
        mine = self.get_state()
        for key in ("seed", "batch_size", "num_records"):
            if int(state[key]) != mine[key]:
                raise ValueError(f"the state was saved with {key}={state[key]}, this pipeline has "
                                 f"{key}={mine[key]}: it would not continue the same sequence")
        self._halt()
        self._state = {k: int(state[k]) for k in ("epoch", "batch", "skipped")}

    def close(self) -> None:
        """Stops the prefetching thread and the workers, and closes the source's files."""
        self._halt()
        self._pool.shutdown(wait=True)
        close = getattr(self.source, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "InputPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
