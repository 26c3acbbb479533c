"""Weights and inputs generated from a seed, identically on every machine, for the CIRKD model fixtures.

Values come from NumPy's PCG64 uniform doubles (integer arithmetic, no transcendental functions, the same stream
on every platform and CPU kernel set), scaled and rounded once to float32. Tensors are drawn in the order of the
given key list, so the weights depend only on the seed and the state dict's keys and shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["seeded_input", "seeded_state"]


def _uniform(rng: np.random.Generator, shape: Sequence[int], low: float, high: float) -> torch.Tensor:
    values = low + (high - low) * rng.random(int(np.prod(shape, dtype=np.int64)))
    return torch.from_numpy(values.astype(np.float32)).reshape(tuple(shape))


def seeded_state(entries: Sequence[tuple[str, Sequence[int]]], seed: int) -> dict[str, torch.Tensor]:
    """A state dict with the given ``(key, shape)`` entries, filled from ``seed`` in key order.

    Convolution weights are uniform with He variance (``2 / fan_in``), so activations keep their scale through
    deep networks; BatchNorm scales and running variances are in ``[0.5, 1.5]``, shifts, biases and running means
    in ``[-0.1, 0.1]``; ``num_batches_tracked`` counters are 0.
    """
    rng = np.random.default_rng(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in entries:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(tuple(shape), dtype=torch.int64)
        elif len(shape) > 1:
            bound = math.sqrt(3.0 * 2.0 / int(np.prod(shape[1:])))
            state[key] = _uniform(rng, shape, -bound, bound)
        elif key.endswith(("running_var", "weight")):
            state[key] = _uniform(rng, shape, 0.5, 1.5)
        else:
            state[key] = _uniform(rng, shape, -0.1, 0.1)
    return state


def seeded_input(shape: Sequence[int], seed: int) -> torch.Tensor:
    """A float32 image batch uniform in ``[-2, 2]`` (about the range of mean-subtracted, std-scaled images)."""
    return _uniform(np.random.default_rng(seed), shape, -2.0, 2.0)
