"""altjax-train with a storage fault injected into orbax's background save, for tests/test_train.py:

    python tests/faulty_storage.py full:STEP  TRAIN-ARGS...   # the save of STEP fails: no space left
    python tests/faulty_storage.py slow:SECONDS TRAIN-ARGS...  # every background save stalls first

The fault is raised where a real one surfaces: in orbax's background thread, while the step's
temporary directory is being written.
"""
import errno
import re
import sys
import time

from orbax.checkpoint._src.checkpointers import async_checkpointer

from altjax import train

mode, value = sys.argv[1].split(":")
wait_for_commit = async_checkpointer._background_wait_for_commit_futures


def faulty_wait(directory, *args, **kwargs):
    step = int(re.search(r"(\d+)(\.orbax-checkpoint-tmp[^/]*)?$", str(directory)).group(1))
    if mode == "full" and step == int(value):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    if mode == "slow":
        time.sleep(float(value))
    return wait_for_commit(directory, *args, **kwargs)


async_checkpointer._background_wait_for_commit_futures = faulty_wait
sys.exit(train.main(sys.argv[2:]))
