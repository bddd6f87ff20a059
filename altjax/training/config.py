"""Training configs: loading a recipe or a config file, overriding its entries, checking it.

A config is an ``ml_collections.ConfigDict`` returned by ``get_config()`` of a Python file: a
recipe shipped with altjax (``configs/``, named without directory or ``.py``: ``demo``,
``align_base``, ``altclip_distill``, ``altclip_contrastive``) or any file, ``FILE:ARG`` calling
``get_config(ARG)``. Every default lives in the config file; the code reads no default of its own.
``config.task`` names the training task (:mod:`altjax.training.tasks`), which reads its own part.

Each override ``a.b=value`` replaces one existing entry; the value is read as the type of the
entry it replaces (``true``/``false`` for booleans, a Python literal for tuples, lists and dicts,
the text itself for strings; an entry that is None takes a Python literal, else the text).

Profiling, off in every recipe: ``config.profile.start_step`` is the first step of a ``jax.profiler``
trace (numbered as the logs number steps; 0: no trace) and ``config.profile.num_steps`` how many
steps it covers; process 0 writes it to ``<workdir>/profile`` for TensorBoard's Profile tab
(:mod:`altjax.training.profiler`).
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Optional, Sequence

import altjax_configs
import ml_collections

from altjax.training import checks, tasks
from altjax.training.checks import ConfigError

# The recipes: top-level configs/ of the repository, installed as the package altjax_configs.
CONFIGS_DIR = os.path.dirname(os.path.abspath(altjax_configs.__file__))


def recipe_path(spec: str) -> tuple[str, Optional[str]]:
    """``(file, argument)`` of a ``--config`` value: a recipe name (``"demo"``: ``configs/demo.py``,
    shipped with altjax) or a Python file, either followed by ``:ARG`` for a ``get_config(ARG)``."""
    name, sep, arg = spec.partition(":")
    if os.sep not in name and "/" not in name and not name.endswith(".py"):
        name = os.path.join(CONFIGS_DIR, f"{name}.py")
    return name, arg if sep else None


def recipes() -> list[str]:
    """The names of the recipes shipped with altjax (``configs/``)."""
    return sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and not f.startswith("_"))


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of ``spec`` (see :func:`recipe_path`: ``get_config()`` of a recipe or a Python
    file, ``get_config(ARG)`` for ``FILE:ARG``) with ``key=value`` overrides applied; raises
    ConfigError for a file that does not give a config or an override that does not fit it."""
    path, arg = recipe_path(spec)
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "no such file"
        raise ConfigError(f"--config {spec}: {what}; give a recipe ({', '.join(recipes())}) or a Python file "
                          f"with get_config()")
    module_spec = importlib.util.spec_from_file_location(f"altjax_config_{abs(hash(path))}", path)
    try:
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config() if arg is None else module.get_config(arg)
    except SyntaxError as e:
        raise ConfigError(f"--config {path}:{e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - the user's file failed: name it, with its own message
        raise ConfigError(f"--config {spec}: get_config() failed: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config {spec}: get_config() returned {type(config).__name__}, not an "
                          "ml_collections.ConfigDict")
    for item in overrides:
        apply_override(config, item)
    return config


# Not ml_collections' config_flags (tried with ml_collections 1.x): it refuses to override an entry
# that is None (``model.vision.bn_group_size``: "Type NoneType ... is not supported for
# overriding"), reads ``total_steps=1e4`` as an error, answers a misspelt key with a multi-line
# AttributeError, and parses through absl's global FLAGS, which notebooks calling load_config do
# not have. It would need as much code around it as this parser is.
def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            # 1e4 is an integer too; 1.5 is not.
            try:
                value = float(text)
            except ValueError:
                raise ValueError("expected an integer") from None
            if not value.is_integer():
                raise ValueError("expected an integer") from None
            return int(value)
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError("expected a Python literal tuple, e.g. (1, 2) or ('a', 'b')") from None
        return type(current)(value if isinstance(value, (tuple, list)) else (value,))
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Applies ``"a.b=value"`` to ``config`` (the key must exist); ConfigError otherwise."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ConfigError(f"--config.{item}: expected --config.KEY=VALUE")
    *parents, last = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if not hasattr(node, "keys") or part not in node:
            raise ConfigError(f"--config.{item}: the config has no {'.'.join(parents[:i + 1])!r}")
        node = node[part]
    if not hasattr(node, "keys") or last not in node:
        raise ConfigError(f"--config.{item}: the config has no key {key!r}"
                          + _suggest(last, list(node.keys()) if hasattr(node, "keys") else []))
    try:
        value = _parse_value(text, node[last])
    except ValueError as e:
        raise ConfigError(f"--config.{item}: {e}, got {text!r}") from None
    if isinstance(node, ml_collections.ConfigDict):
        with node.ignore_type():
            node[last] = value
    else:
        node[last] = value


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate(config: ml_collections.ConfigDict) -> list[str]:
    """Raises ConfigError listing every problem of ``config`` (its task's part included); returns
    warnings (suspicious but valid values, e.g. a run that ends before its warmup does)."""
    c = checks.Checker(config)
    name = c.string("task")
    if name is not None and name not in tasks.TASKS:
        c.fail("task", f"unknown {name!r}; choose one of {', '.join(repr(t) for t in tasks.TASKS)}")
    warnings = checks.check_common(c)
    if name in tasks.TASKS:
        tasks.TASKS[name].check(c)
    c.finish()
    return warnings
