"""How the feature cache stores its dtypes: float16, float32, or bfloat16 as its uint16 bits
(numpy has no bfloat16), with the casts both ways and the finiteness check on the stored
representation."""

from __future__ import annotations

from typing import Any

import numpy as np

DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}  # name -> stored numpy dtype


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (exact: bf16 is the top half of an f32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_storage(features: Any, dtype: str) -> np.ndarray:
    """Cast to the stored numpy dtype; bfloat16 goes through torch (round to nearest even)."""
    if dtype == "bfloat16":
        import torch

        t = (
            features
            if isinstance(features, torch.Tensor)
            else torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        )
        return t.detach().cpu().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if hasattr(features, "detach"):  # torch tensor (possibly bf16, which numpy lacks)
        features = features.detach().cpu().float().numpy()
    with np.errstate(over="ignore"):  # overflow becomes Inf, reported by the caller with advice
        return np.ascontiguousarray(features, dtype=DTYPES[dtype])


def finite_rows(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Per-row bool: all values finite. Works on the stored representation."""
    flat = stored.reshape(len(stored), int(np.prod(stored.shape[1:])))
    if dtype == "bfloat16":
        return ~((flat & 0x7F80) == 0x7F80).any(axis=1)  # exponent all ones = Inf/NaN
    return np.isfinite(flat).all(axis=1)
