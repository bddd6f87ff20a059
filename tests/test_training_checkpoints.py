"""altjax.training.checkpoints (train-state checkpoints): what an interrupted save leaves, and what the
next run clears."""
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp

from altjax.training import checkpoints


def test_remove_temporary_outlasts_writers_that_recreate_their_directories(tmp_path):
    """Writer threads keep making their directories and files (as orbax's do, each until a write
    fails) while the process removes the temporary checkpoint and exits: nothing temporary may be
    left, moved aside or not."""
    script = textwrap.dedent(f"""
        import os, threading, time
        from altjax.training import checkpoints
        root = {str(tmp_path)!r}
        started = threading.Barrier(5)

        def write(k):
            started.wait()
            n = 0
            while True:
                n += 1
                try:
                    os.makedirs(os.path.join(root, "4.orbax-checkpoint-tmp", "state", f"d{{k}}"), exist_ok=True)
                    with open(os.path.join(root, "4.orbax-checkpoint-tmp", "state", f"d{{k}}", str(n)), "w") as f:
                        f.write("x" * 1000)
                except OSError:
                    return

        for k in range(4):
            threading.Thread(target=write, args=(k,), daemon=True).start()
        started.wait()
        time.sleep(0.2)
        checkpoints.remove_temporary(root)
        os._exit(0)
    """)
    for _ in range(5):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert os.listdir(tmp_path) == [], f"left behind: {os.listdir(tmp_path)}"


def test_a_new_checkpointer_clears_what_an_interrupted_one_left(tmp_path):
    directory = tmp_path / "checkpoints"
    (directory / f"{checkpoints.ABANDONED}0-4" / "state").mkdir(parents=True)
    (directory / f"{checkpoints.ABANDONED}0-4" / "state" / "x").write_text("x")
    (directory / "5.orbax-checkpoint-tmp").write_text("")
    (directory / "6.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    checkpoints.Checkpointer(str(directory), {"w": jnp.zeros(3)}).close()
    assert os.listdir(directory) == [], f"left behind: {os.listdir(directory)}"
