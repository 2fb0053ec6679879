"""The argument groups of the forward, backward and prediction kernels.

Numba passes a NamedTuple of arrays and scalars as one argument and reads its fields by name at no
cost, so a kernel takes a few of these instead of dozens of positional arrays that could be swapped
silently. Shapes: kernels/forward.py (b = batch size, D = output layer index).

Two rules keep them correct inside a parallel (`prange`) loop body, as Numba compiles it:
- a group holding tuples (Layers, Tables, Activations) cannot be a free variable of the loop: unpack it
  before the loop and rebuild it inside (`net = Layers(weights, b0, layer_slot)`);
- the loop body stores only into arrays unpacked before the loop, never through a group's field
  (`n_scored[i] = m`, not `out.n_scored[i] = m`): Numba drops such a store as dead. Serial kernels the
  loop calls may take and write through groups freely.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Layers(NamedTuple):
    """The network's parameters: weights (W[0] .. W[D], float32 or bfloat16 bits), b0 float32 (h1,)
    (layer 0's bias) and layer_slot int64 (D + 1,) (each layer's hash-table slot, -1 = dense)."""

    weights: tuple
    b0: np.ndarray
    layer_slot: np.ndarray


class Tables(NamedTuple):
    """Per sampled layer (tuples indexed by slot): its hash functions (idx, sign, params, see
    lsh.HashFunctions), its buckets (offsets int64 (L, buckets + 1), ids int32 (L, entries)) and the
    hubs int32 that join every active set."""

    hidx: tuple
    hsign: tuple
    hparams: tuple
    offsets: tuple
    ids: tuple
    hubs: tuple


class HubRows(NamedTuple):
    """An output layer's hubs as predict_batch_hubs scores them: ids int32 (h,), place int32 (labels,) (each
    label's index in ids, -1 for the others) and rows (h, width + 1), the layer's rows of ids packed in their order
    (the same dtype as the layer), or (0, width + 1) to read them from the layer."""

    ids: np.ndarray
    place: np.ndarray
    rows: np.ndarray


class Retrieval(NamedTuple):
    """How a sampled layer's candidates are picked: `probes` extra buckets per table (multi-probe),
    only neurons seen in >= `threshold` buckets, at most max_active int64 (slots,) per layer (0 = no cap)."""

    probes: int
    threshold: int
    max_active: np.ndarray


class Sampling(NamedTuple):
    """Training's additions to the retrieved set: random neurons up to `min_active`, `random_negatives`
    log-Q-corrected uniform draws on a sampled output layer (shared by `negative_group` consecutive
    points), only `hard_negatives` non-label deltas kept (0 = all); `seed` keys these random draws, and
    `dropout_seed` the dropout of each hidden unit with probability `hidden_dropout` (0 = none): the shards of
    a label-sharded model draw their own negatives but drop the same units of their replicated hidden layers.
    `sigmoid`: the output layer's loss is a logistic loss per label (forward.sigmoid_deltas), not the softmax."""

    min_active: int
    seed: int
    hard_negatives: int
    random_negatives: int
    negative_group: int
    hidden_dropout: float
    dropout_seed: int
    sigmoid: bool


class Batch(NamedTuple):
    """Points as CSR arrays: features (x_indptr int64, x_indices int32, x_values float32) and labels
    (y_indptr int64, y_indices int32)."""

    x_indptr: np.ndarray
    x_indices: np.ndarray
    x_values: np.ndarray
    y_indptr: np.ndarray
    y_indices: np.ndarray


class Activations(NamedTuple):
    """Per batch slot: hid (tuple over hidden layers, float32 (b, width)), act_ids / act_val (tuples over
    layers 1 .. D, (b, cap)), nact int32 (b, D + 1), nkept int32 (b,), delta0 float32 (b, h1) and
    losses float32 (b,)."""

    hid: tuple
    act_ids: tuple
    act_val: tuple
    nact: np.ndarray
    nkept: np.ndarray
    delta0: np.ndarray
    losses: np.ndarray


class Lookup(NamedTuple):
    """Per worker chunk (row c of each array): active-set membership (tags int64 (widest sampled
    layer,), counts int32, gens int64 (chunks,); see kernels.sampling) and one input's hash codes and
    buckets (qmargins float64 and qcodes int32 (L*K,), qbuck int32 (L * (1 + probes),))."""

    tags: np.ndarray
    counts: np.ndarray
    gens: np.ndarray
    qmargins: np.ndarray
    qcodes: np.ndarray
    qbuck: np.ndarray


class Backprop(NamedTuple):
    """Per worker chunk: gin and gprev float32 (chunks, widest layer), the gradient rows of the
    backward pass."""

    gin: np.ndarray
    gprev: np.ndarray


class TopK(NamedTuple):
    """Prediction's output, one row per point: labels int32 (n, k), scores float32 (n, k), n_scored int64 (n,)."""

    labels: np.ndarray
    scores: np.ndarray
    n_scored: np.ndarray
