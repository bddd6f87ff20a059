"""The notebooks run top to bottom (nbclient, a fresh kernel each) at a tiny size and draw their plots.

Each notebook's cell tagged ``parameters`` holds its sizes; as papermill does, a cell that sets
smaller ones is inserted after it, so what runs is the committed notebook at toy scale. The kernel
inherits this process's environment (tests/conftest.py: CPU, 8 simulated devices) and shares one
JAX compilation cache with the other notebooks (their runs compile the same models).
"""
import base64
import io
import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
SCENES = "dict(image_size=64, num_train=512, num_validation=64, num_test=128, seed=0)"
# Compiling each run's train step is most of a notebook's time at toy size, so the ablations run
# a subset of their runs: each kind of comparison (a loss variant, a batch size, a group size) once.
TINY = {  # notebook -> (parameter overrides, plots it must draw)
    "loss_ablation": ("STEPS = 20\nEVAL_EVERY = 10\nRUNS = {k: RUNS[k] for k in ('ALIGN', 'sigmoid', 'batch 32')}", 2),
    "batchnorm_ablation": ("STEPS = 20\nEVAL_EVERY = 10\nGROUP_SIZES = (None, 4)", 3),
    "altclip_two_phase": ("SCALE = 0.05", 4),
}


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory) -> dict:
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("notebook-jax-cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def execute(name: str, parameters: str, tmp_path, env: dict) -> nbformat.NotebookNode:
    nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged 'parameters', expected 1"
    injected = (f"{parameters}\nWORKDIR = {str(tmp_path / 'work')!r}\nDATA_DIR = {str(tmp_path / 'data')!r}\n"
                f"SCENES = {SCENES}")
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(injected))
    client = NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)
    return nb


def plots(nb) -> list[np.ndarray]:
    images = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                png = base64.b64decode(output["data"]["image/png"])
                images.append(np.asarray(Image.open(io.BytesIO(png)).convert("L")))
    return images


@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_runs_and_plots(name, tmp_path, kernel_env):
    parameters, expected = TINY[name]
    nb = execute(name, parameters, tmp_path, kernel_env)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    images = plots(nb)
    assert len(images) == expected, f"{name}: {len(images)} plots rendered, expected {expected}"
    for i, image in enumerate(images):
        # A rendered figure has axes, lines and text: many distinct grey levels, not a blank canvas.
        assert image.shape[0] > 200 and image.shape[1] > 300, f"{name}: plot {i} is only {image.shape}"
        assert len(np.unique(image)) > 20 and image.std() > 5, f"{name}: plot {i} looks blank (std {image.std():.1f})"
