"""The persistent XLA compilation cache of training runs.

Compiling a run's step and initialiser is most of its start-up (the demo: 17 s and 10 s of a 45 s
run on a 2-core CPU; minutes for the large recipes on accelerators), and a preempted run that is
restarted compiles exactly the same programs again. With the cache on, the restart loads them from
disk. ``config.compilation_cache_dir`` names the directory (``~`` expanded; empty: off); a cache
JAX already has (``JAX_COMPILATION_CACHE_DIR``, or ``jax.config`` set by the user) is used instead.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import jax
from jax.experimental.compilation_cache import compilation_cache

log = logging.getLogger("altjax.train")


def enable(directory: str) -> Optional[str]:
    """Turns the persistent compilation cache on in ``directory`` unless JAX already has one;
    returns the directory in use (None: off). A directory that cannot be created is a warning,
    not an error: the run compiles as it would without the cache."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if not directory:
        return None
    path = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        log.warning("compilation_cache_dir %s: cannot create it (%s); compiling without a cache", path,
                    e.strerror or e)
        return None
    compilation_cache.set_cache_dir(path)
    # JAX decides once per process whether the cache is on, at the first compilation; a notebook
    # may have compiled something before this run, so that decision is taken again.
    compilation_cache.reset_cache()
    return path
