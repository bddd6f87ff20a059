"""Shared test utilities: PyTorch state dicts as NumPy, and comparisons that say what differed."""
from __future__ import annotations

import numpy as np


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def torch_state(module) -> dict[str, np.ndarray]:
    """``module.state_dict()`` as NumPy arrays (exact copies, dtype kept)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def max_abs(actual, expected) -> float:
    return float(np.max(np.abs(to_numpy(actual).astype(np.float64) - to_numpy(expected).astype(np.float64))))


def assert_close(actual, expected, *, atol: float, what: str) -> float:
    """Asserts max |actual - expected| <= atol; returns the measured difference."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != reference shape {e.shape}"
    diff = max_abs(a, e)
    assert diff <= atol, f"{what}: max abs difference {diff:.3e} > tolerance {atol:.1e}"
    return diff


def assert_rel_close(actual, expected, *, rtol: float, what: str) -> float:
    """Asserts max|a - e| / max|e| <= rtol (the relative measure used for gradients)."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != reference shape {e.shape}"
    scale = float(np.max(np.abs(e)))
    diff = max_abs(a, e)
    rel = diff / scale if scale > 0 else diff
    assert rel <= rtol, f"{what}: max abs difference {diff:.3e} is {rel:.3e} of max |ref| {scale:.3e} > {rtol:.1e}"
    return rel


def cosine(a, b) -> np.ndarray:
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def assert_round_trip(back: dict, state: dict) -> None:
    """Asserts an exported state dict equals the original bit for bit, key for key, dtype for dtype."""
    assert set(back) == set(state), f"key sets differ: {sorted(set(back) ^ set(state))}"
    for k, v in state.items():
        assert back[k].dtype == v.dtype, f"{k}: dtype {back[k].dtype} != {v.dtype}"
        np.testing.assert_array_equal(back[k], v, err_msg=f"{k} changed in the round trip")
