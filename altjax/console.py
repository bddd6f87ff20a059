"""The console of altjax's commands: progress bars (tqdm), lines printed above them, and the
third-party messages a command keeps off its output unless asked (``--verbose``).

:class:`Progress` is a tqdm bar on stderr, drawn by process 0 only. On a terminal it is redrawn in
place; elsewhere (a log file, CI) it prints one line every :data:`LOG_INTERVAL_S` seconds, so a
long run stays visible without flooding its log. :func:`echo` prints a line on stderr above a bar.

:func:`quiet_third_party` is called first by every command: by default the libraries under altjax
(tfds, absl, orbax, transformers, TensorFlow's C++ logging) keep their INFO and WARNING messages to
themselves, and :func:`third_party_stdout` drops what tfds prints on stdout (where a command's
results go) as it generates a dataset. altjax's own warnings and errors are never silenced.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import textwrap
import warnings
from typing import Iterator, Optional, TextIO

import jax
from absl import logging as absl_logging
from tqdm import tqdm

# Off a terminal a bar becomes a log line this often at most.
LOG_INTERVAL_S = 15.0
# rate_text (Progress.format_dict): tqdm's own rate_fmt pads the number and inverts slow rates
# ("1.89s/steps").
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_text}, elapsed {elapsed}, eta {remaining}"
OPEN_LINE_FORMAT = "{desc}: {n_fmt} {unit}, {rate_text}, elapsed {elapsed}"  # no total known

HELP_WIDTH = 100  # the epilogs of --help, laid out by hand
VERBOSE_HELP = "show the INFO and WARNING messages of tfds, absl, orbax and transformers, and altjax's INFO logs"

# Loggers of the libraries under altjax, kept at ERROR by default.
THIRD_PARTY_LOGGERS = ("absl", "orbax", "tensorflow", "tensorflow_datasets", "jax._src.xla_bridge", "etils",
                       "transformers", "huggingface_hub")
# Modules whose Python warnings (deprecations inside the libraries) are not shown by default.
THIRD_PARTY_WARNING_MODULES = (r"orbax(\.|$)", r"tensorflow_datasets(\.|$)", r"absl(\.|$)", r"etils(\.|$)",
                               r"transformers(\.|$)")

_quiet = False  # set by quiet_third_party(verbose=False): a command runs, not a notebook


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Lines:
    """A stream for tqdm off a terminal: each redraw (``"\\r" + line + padding``) becomes a line
    of its own, and the carriage returns and clearing writes are dropped."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.lstrip("\r").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Progress(tqdm):
    """``with Progress(total, "embedding images", unit="images") as bar: ... bar.update(n)``.

    A tqdm bar on stderr (or ``file``), shown by process 0 only and when ``enabled``; ``initial``
    work done before (a resumed run) counts toward the total but not toward the rate. Other
    keyword arguments are tqdm's (``unit_scale=True`` for bytes)."""

    # No monitor thread: a bar changes only when updated, from the thread that updates it.
    monitor_interval = 0

    def __init__(self, total: Optional[float], desc: str, *, unit: str = "it", enabled: bool = True,
                 file: Optional[TextIO] = None, **kwargs):
        file = sys.stderr if file is None else file
        terminal = _is_terminal(file)
        if not terminal:
            # The rate of a line is the average since the start, not tqdm's recent estimate.
            kwargs = {"mininterval": LOG_INTERVAL_S, "smoothing": 0,
                      "bar_format": OPEN_LINE_FORMAT if total is None else LINE_FORMAT, **kwargs}
            file = _Lines(file)
        super().__init__(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=terminal,
                         disable=not enabled or jax.process_index() != 0, **kwargs)

    @property
    def format_dict(self):
        values = super().format_dict
        rate, done = values["rate"], values["n"] - values.get("initial", 0)
        if not rate and done > 0 and values["elapsed"]:
            rate = done / values["elapsed"]
        unit = values["unit"]
        if not rate:
            values["rate_text"] = f"? {unit}/s"
        elif values.get("unit_scale"):
            values["rate_text"] = f"{tqdm.format_sizeof(rate)}{unit}/s"
        else:
            values["rate_text"] = f"{rate:.2f} {unit}/s"
        return values


def echo(line: str) -> None:
    """Prints ``line`` on stderr above the progress bars being drawn there, which are redrawn
    below it."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def help_section(title: str, text: str) -> str:
    """A section of a command's ``--help`` epilog: ``title:`` and ``text`` wrapped, indented."""
    return f"{title}:\n" + textwrap.fill(" ".join(text.split()), HELP_WIDTH, initial_indent="  ",
                                         subsequent_indent="  ", break_on_hyphens=False)


def exit_status_help(codes: dict[int, str]) -> str:
    """The ``exit status`` section of a command's ``--help`` epilog: one entry per code."""
    return "exit status:\n" + "\n".join(
        textwrap.fill(f"{code:<4}{text}", HELP_WIDTH, initial_indent="  ", subsequent_indent="      ",
                      break_on_hyphens=False)
        for code, text in codes.items())


def quiet_third_party(verbose: bool) -> None:
    """Sets up a command's logging: ``LEVEL name: message`` lines on stderr, altjax's warnings and
    errors always; by default (``verbose`` False) the libraries under altjax keep their INFO and
    WARNING messages to themselves, with ``verbose`` (``--verbose``) they and altjax log down to
    INFO. An environment variable the user set (``TF_CPP_MIN_LOG_LEVEL``,
    ``TRANSFORMERS_VERBOSITY``) is left as it is."""
    global _quiet
    _quiet = not verbose
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    level = logging.INFO if verbose else logging.ERROR
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.getLogger("altjax").setLevel(logging.INFO if verbose else logging.WARNING)
    absl_logging.set_verbosity("info" if verbose else "error")
    if "transformers" in sys.modules:  # it reads TRANSFORMERS_VERBOSITY once, as it loads
        sys.modules["transformers"].utils.logging.set_verbosity(level)
    if verbose:
        return
    # Read as the libraries load (TensorFlow only on demand, by tfds).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for module in THIRD_PARTY_WARNING_MODULES:
        warnings.filterwarnings("ignore", module=module)


@contextlib.contextmanager
def third_party_stdout() -> Iterator[None]:
    """Drops what is printed on stdout inside, when :func:`quiet_third_party` made the command
    quiet: tfds announces every dataset it generates with ``print``, on the stdout a command
    writes its results to."""
    if not _quiet:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
