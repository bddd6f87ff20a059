"""The console of the commands: tqdm progress off and on a terminal, lines above a bar, and the
third-party messages kept quiet unless --verbose (the commands themselves: test_evaluation_cli,
test_train)."""
import io
import logging
import re
import warnings

import pytest

from altjax import console

LINE = re.compile(r"^work: (\d+)/10 items \(\d+%\), (\?|\d+\.\d\d) items/s, elapsed \d\d:\d\d, eta \S+$")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_each_redraw_is_a_line_of_its_own():
    out = io.StringIO()
    with console.Progress(10, "work", unit="items", file=out, mininterval=0) as bar:
        for _ in range(10):
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n"), f"not plain lines: {text!r}"
    lines = text.splitlines()
    bad = [line for line in lines if not LINE.match(line)]
    assert not bad, f"lines not in the log format: {bad}"
    counts = [int(LINE.match(line).group(1)) for line in lines]
    assert counts == sorted(counts) and counts[-1] == 10 and len(lines) >= 10, f"counts {counts}"


def test_work_done_before_counts_toward_the_total_not_the_rate():
    out = io.StringIO()
    console.Progress(10, "work", unit="items", file=out, initial=10).close()
    last = LINE.match(out.getvalue().splitlines()[-1])
    assert last and last.group(1) == "10" and last.group(2) == "?", \
        f"a bar with nothing done in this process shows a rate: {out.getvalue()!r}"


def test_on_a_terminal_the_bar_is_redrawn_in_place():
    out = Terminal()
    with console.Progress(3, "work", unit="items", file=out, mininterval=0) as bar:
        bar.update(3)
    text = out.getvalue()
    assert text.count("\r") >= 2 and text.endswith("\n") and text.count("\n") == 1, f"not redrawn: {text!r}"
    assert "3/3" in text, text


def test_a_disabled_bar_writes_nothing():
    out = io.StringIO()
    with console.Progress(3, "work", file=out, enabled=False) as bar:
        bar.update(3)
    assert out.getvalue() == "", out.getvalue()


def test_echo_prints_a_line_on_stderr(capsys):
    console.echo("step 3/10: loss 1.0")
    assert capsys.readouterr().err == "step 3/10: loss 1.0\n"


@pytest.fixture()
def restore_console(monkeypatch):
    """quiet_third_party changes process-wide settings: put them back after the test."""
    names = (*console.THIRD_PARTY_LOGGERS, "altjax")
    levels = {name: logging.getLogger(name).level for name in names}
    for variable in ("TF_CPP_MIN_LOG_LEVEL", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(variable, raising=False)
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    with warnings.catch_warnings():
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    absl_logging.set_verbosity(verbosity)
    console._quiet = False


def _shown(logger: str, level: int) -> bool:
    return logging.getLogger(logger).isEnabledFor(level)


def test_third_party_messages_are_quiet_by_default_and_shown_with_verbose(restore_console, capsys):
    import os

    console.quiet_third_party(verbose=False)
    shown = [name for name in console.THIRD_PARTY_LOGGERS if _shown(name, logging.WARNING)]
    assert not shown, f"third-party warnings shown by default: {shown}"
    assert _shown("altjax.train", logging.WARNING) and not _shown("altjax.train", logging.INFO), \
        "altjax's own warnings must stay, its INFO logs go"
    assert _shown("absl", logging.ERROR), "third-party errors must stay"
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    with warnings.catch_warnings(record=True) as caught:
        # catch_warnings(record=True) keeps the filters quiet_third_party installed, before its own.
        warnings.simplefilter("always")
        console.quiet_third_party(verbose=False)
        warnings.warn_explicit("a deprecation inside orbax", DeprecationWarning, "checkpoint.py", 1,
                               module="orbax.checkpoint")
        warnings.warn_explicit("skipped 2 of 10 images", UserWarning, "loop.py", 1, module="altjax.training.loop")
    assert [str(w.message) for w in caught] == ["skipped 2 of 10 images"], [str(w.message) for w in caught]
    with console.third_party_stdout():
        print("Downloading and preparing dataset Unknown size")
    assert capsys.readouterr().out == "", "tfds's announcement reached stdout"

    console.quiet_third_party(verbose=True)
    hidden = [name for name in console.THIRD_PARTY_LOGGERS if not _shown(name, logging.INFO)]
    assert not hidden, f"--verbose hides {hidden}"
    assert _shown("altjax.train", logging.INFO), "--verbose hides altjax's INFO logs"
    with console.third_party_stdout():
        print("Downloading and preparing dataset Unknown size")
    assert "Downloading" in capsys.readouterr().out, "--verbose hides tfds's announcement"


def test_help_sections_wrap_and_list_each_exit_status():
    text = console.exit_status_help({0: "done", 2: "mistake " * 30})
    lines = text.splitlines()
    assert lines[0] == "exit status:" and lines[1] == "  0   done", lines
    assert all(len(line) <= console.HELP_WIDTH for line in lines), lines
    assert lines[2].startswith("  2   mistake") and lines[3].startswith("      mistake"), lines
