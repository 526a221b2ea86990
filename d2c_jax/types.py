"""The types every module shares: base params, LoRA trees, token batches, weight dtypes.

Shapes: L layers, R rank, d_in / d_out module widths, S sequence; `...` = any leading axes
(n examples, T tasks, C candidates, steps).

- `Params`: the base model as a plain nested dict in Flax's convention (`kernel` [in, out], layers
  stacked on axis 0); the table of paths is in docs/architecture.md.
- `Lora`: the decoder's adapter tree `{module: {"a": [L, R, d_in], "b": [L, d_out, R]}}` with the
  scaling folded into b (a leading candidate axis may be added to every leaf).
- `TokenBatch`: the four right-padded token arrays that travel together (data.py's layout), a
  pytree so that `jax.tree.map` slices, stacks or gathers all four at once.
- `DTYPES`: the base weight dtypes every command line offers (what hf_io can load).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

Array = jax.Array | np.ndarray
Params = dict[str, Any]
Lora = dict[str, dict[str, Array]]

DTYPES = ("bfloat16", "float32")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Right-padded rows: inputs = example[:-1], targets = example[1:]; every leaf [..., S]."""

    tokens: Array  # int32: input token ids (pad past the row's end)
    targets: Array  # int32: the next token of each input
    weights: Array  # float32: loss weight of each target (1 on response tokens)
    attn: Array  # int32: 1 on real tokens; a dummy row attends to one pad token

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tokens.shape)
