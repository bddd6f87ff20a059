"""The input pipeline: a deterministic, resumable iterator of preprocessed, tokenised batches.

Order. Epoch ``e`` visits the records in the permutation drawn from ``(seed, e)`` (or in order
without ``shuffle``); process ``p`` of ``P`` takes every ``P``-th entry from the ``p``-th, so the
processes read disjoint parts that together cover the epoch (with ``drop_remainder`` each takes
``N // P`` records, so that all processes make the same number of steps). Every random choice for
a record (crop, which of its captions) comes from a generator seeded with ``(seed, epoch,
record index)``: the batches depend on the seed alone, not on threads, timing or prefetching.

Resume. The iterator's position is ``(epoch, position)``: the epoch and how many entries of this
process's share of it were consumed. :meth:`InputPipeline.get_state` returns it (with the seed,
the process layout and the skip count) as a small JSON-serialisable dict, for the training
checkpoint; :meth:`InputPipeline.set_state` on a fresh pipeline over the same data continues with
exactly the batches the first one would have produced next.

Damage. A record that cannot be read or decoded, or whose caption is empty or whitespace only, is
skipped: counted in :attr:`InputPipeline.skipped` (and in the state) and logged as a warning on
the ``altjax.data`` logger. (Of a list of captions, the empty ones are never drawn; the record is
skipped when all are empty.) Skipping is deterministic (the same records fail every time), so resume stays exact. A
run of ``max_consecutive_failures`` failures in a row means a wrong key or a broken setup, not
damaged data, and raises.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from altjax.data.preprocess import (EmptyCaptionError, ImageTransform, TextField, choose_caption, decode_image,
                                    tokenize)
from altjax.data.sources import get_field

log = logging.getLogger("altjax.data")

_STATE_KEYS = ("epoch", "position", "seed", "skipped", "process_index", "process_count", "num_records")
_END = object()


class _Failure:
    """A record that could not be read, decoded or transformed."""

    def __init__(self, index: int, error: BaseException):
        self.index, self.error = index, error


class InputPipeline(Iterator[dict[str, np.ndarray]]):
    """Batches of ``pixel_values`` float32 (B, H, W, 3), ``input_ids``/``attention_mask``
    (/``token_type_ids``) int32 (B, L) per text field, and the ``extra_keys`` fields (e.g. the
    scenes' ``label``), read from ``source`` (see :mod:`altjax.data.sources`).

    Args:
      source: a random-access source (``len``, ``[i]`` -> dict of fields, ``describe(i)``).
      batch_size: examples per batch on this process (the global batch divided by the process count).
      image: the image transform (e.g. ``ImageTransform(align_image_config(289), "random_crop")``).
      texts: one :class:`TextField` or several (parallel texts, each with its own output prefix).
      image_key: the image field; None takes ``source.image_key``.
      extra_keys: fields copied into the batch as arrays.
      seed: the seed of the order and of every random choice.
      shuffle: visit the records of each epoch in a random order.
      num_epochs: stop after this many epochs; None repeats forever.
      drop_remainder: drop the last batch of an epoch when it is short (and give every process the
        same share of each epoch); when False the short batch is returned.
      process_index, process_count: this process and the number of processes reading the data;
        default ``jax.process_index()`` and ``jax.process_count()``.
      num_threads: threads decoding and transforming examples.
      prefetch: batches prepared ahead in a background thread (0: prepared on demand).
      max_consecutive_failures: raise when this many records in a row fail.
    """

    def __init__(self, source, *, batch_size: int, image: ImageTransform, texts: TextField | Sequence[TextField],
                 image_key: str | None = None, extra_keys: Sequence[str] = (), seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, drop_remainder: bool = True,
                 process_index: int | None = None, process_count: int | None = None,
                 num_threads: int | None = None, prefetch: int = 2, max_consecutive_failures: int = 1000):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
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
        self.process_index, self.process_count = process_index, process_count
        self.num_records = len(source)
        if self.num_records // process_count < (batch_size if drop_remainder else 1):
            raise ValueError(f"{self.num_records} records cannot give one batch of {batch_size} to each "
                             f"of {process_count} processes")
        self.max_consecutive_failures = max_consecutive_failures
        self.prefetch = prefetch
        self._pool = concurrent.futures.ThreadPoolExecutor(num_threads or min(4, os.cpu_count() or 1),
                                                           thread_name_prefix="altjax-data")
        self._order_cache: tuple[int, np.ndarray] | None = None
        # The consumer's view: the state after the last batch returned by __next__.
        self._state = {"epoch": 0, "position": 0, "skipped": 0}
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._generator: Iterator | None = None  # the batches when prefetch is 0

    # ----- order -----

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The record indices this process reads in ``epoch``, in order."""
        cached = self._order_cache  # read once: the prefetch thread may replace it meanwhile
        if cached is not None and cached[0] == epoch:
            return cached[1]
        n = self.num_records
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        share = order[self.process_index::self.process_count]
        if self.drop_remainder:
            share = share[:n // self.process_count]
        self._order_cache = (epoch, share)
        return share

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

    def _batches(self, epoch: int, position: int, skipped: int):
        """Yields (batch, state after it) from the given cursor."""
        consecutive = 0
        while self.num_epochs is None or epoch < self.num_epochs:
            order = self.epoch_order(epoch)
            examples = []
            while len(examples) < self.batch_size and position < len(order):
                take = order[position:position + self.batch_size - len(examples)]
                position += len(take)
                for result in self._pool.map(self._load, take, [epoch] * len(take)):
                    if isinstance(result, _Failure):
                        skipped += 1
                        consecutive += 1
                        self._warn(result, skipped)
                        if consecutive >= self.max_consecutive_failures:
                            raise RuntimeError(
                                f"{consecutive} records in a row failed, the last "
                                f"{self.source.describe(result.index)}: {type(result.error).__name__}: "
                                f"{result.error}. Check the image/caption keys and the transform.") from result.error
                    else:
                        consecutive = 0
                        examples.append(result)
            if position >= len(order):
                epoch, position = epoch + 1, 0
            if len(examples) == self.batch_size or (examples and not self.drop_remainder):
                yield self._collate(examples), {"epoch": epoch, "position": position, "skipped": skipped}
        # The end: no batch, but the records skipped after the last one still count.
        yield None, {"epoch": epoch, "position": position, "skipped": skipped}

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
            for item in self._batches(start["epoch"], start["position"], start["skipped"]):
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
                self._generator = self._batches(self._state["epoch"], self._state["position"],
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
        """The position after the last batch returned, as a JSON-serialisable dict."""
        return {**self._state, "seed": self.seed, "process_index": self.process_index,
                "process_count": self.process_count, "num_records": self.num_records}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a state of :meth:`get_state` (of a pipeline over the same data, seed and
        process layout: anything else could not continue the same sequence and raises)."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"not an input pipeline state (missing {missing}): {state}")
        mine = self.get_state()
        for key in ("seed", "process_index", "process_count", "num_records"):
            if int(state[key]) != mine[key]:
                raise ValueError(f"the state was saved with {key}={state[key]}, this pipeline has "
                                 f"{key}={mine[key]}: it would not continue the same sequence")
        self._halt()
        self._state = {k: int(state[k]) for k in ("epoch", "position", "skipped")}

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
