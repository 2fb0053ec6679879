"""The SLIDE network: parameters, per-layer hash functions and tables, and top-k prediction.

Layer 0 is the sparse input layer, W0 (num_features, h1) with bias b0 float32 (h1,). Layers
1..D have W[l] (out_l, in_l + 1), neuron-major with the bias in the last column; D is the
output layer (one neuron per label). A layer is LSH-sampled when it has a hash-table slot. Every W
is float32 or bfloat16 bits (uint16), as config.model.weight_dtype says; `float_weights` decodes one.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Literal, NamedTuple

import numba
import numpy as np

from . import labels, lsh, tables
from ._numba import read_only
from .config import SlideConfig
from .kernels.groups import HubRows, Layers, Lookup, Retrieval, TopK
from .kernels.groups import Tables as KernelTables
from .kernels.inference import (
    last_hidden_batch,
    last_hidden_batch_serial,
    predict_batch,
    predict_batch_hubs,
    predict_batch_hubs_serial,
    predict_batch_serial,
)
from .kernels.optimizer import from_bfloat16, to_bfloat16
from .kernels.rows import column_sums, row_norms, row_scores
from .lsh import HashFunctions
from .metrics import precision_at_k, topk_recall
from .resolve import Resolved, concrete, hidden_widths, resolve
from .sparse import unit_rows
from .tables import Tables

if TYPE_CHECKING:
    from .text import LabelNames, TextFeaturizer

PredictMode = Literal["auto", "lsh", "exact"]
PREDICT_MODES = ("auto", "lsh", "exact")
AUTO_MIN_RECALL = 0.95
"""`auto` serves a wide layer from its tables only if they return at least this share of the exact top-5."""
AUTO_MAX_P1_LOSS = 0.005
"""... and, when calibration points have labels, lose at most this much P@1 against scoring every neuron."""
_CALIBRATION_K = 5
SERVE_HUBS_MAX_SHARE = 16
"""Calibration grows a wide layer's auto serving hubs up to 1/this of the layer: lsh then still scores at most
about a tenth of what `exact` does."""


class Predictions(NamedTuple):
    """What `SlideModel.predict_with_stats` returns: top-k labels int32 (n, k), their scores float32 (n, k),
    int64 (n,) output neurons scored per point, and the mode that answered (`lsh` when any layer used its
    tables, else `exact`)."""

    labels: np.ndarray
    scores: np.ndarray
    n_scored: np.ndarray
    mode: str


_MAX_K = 1000
_SERIAL_BELOW = 4
"""Most points a prediction call answers without threads (a thread-pool wake-up costs more than it saves)."""
_HUB_BLOCK = 1024
"""Points a block of predict_batch_hubs holds at most (their hub scores: 27 MB at 6,700 hubs)."""
_SCRATCH_POOL: dict[tuple, list[tuple]] = {}
_SCRATCH_LOCK = threading.Lock()
_INIT_ROWS = 1 << 15
"""Rows drawn at a time when a layer is initialised (16 MB of float32 at width 128)."""


class _HubPack(NamedTuple):
    """SlideModel._hub_arrays' cache: the read-only output layer the rows were packed from (None: not packed), a copy
    of the hubs, each label's place among them (-1 for the others) and the packed rows."""

    layer: np.ndarray | None
    hubs: np.ndarray
    place: np.ndarray
    rows: np.ndarray


class SlideModel:
    """Weights + hash tables; `predict` serves top-k labels, sub-linearly in `lsh` mode."""

    # set by snapshot.load_model on a model read from a snapshot
    version: int
    trainer_state: dict

    def __init__(
        self,
        config: SlideConfig,
        num_features: int,
        num_labels: int,
        weights: tuple,
        b0: np.ndarray,
        hashes: list[HashFunctions],
        tables_: list[Tables],
        serve_tables: np.ndarray | None = None,
    ):
        if config.model.hidden is None:  # the widths the weights have (what auto resolved to when they were made)
            config = config.replace(
                model=config.model.replace(hidden=(weights[0].shape[1], *(w.shape[0] for w in weights[1:-1])))
            )
        self.config = config
        self.num_features = int(num_features)
        self.num_labels = int(num_labels)
        self.weights = tuple(weights)
        want = weight_storage(config)
        if any(w.dtype != want for w in self.weights):
            raise ValueError(
                f"weights must be {np.dtype(want)} for weight_dtype={config.model.weight_dtype}, "
                f"got {[str(w.dtype) for w in self.weights]}"
            )
        self.b0 = b0
        self.hashes = list(hashes)
        self.tables = list(tables_)
        plan = resolve(config, self.num_features, self.num_labels)
        self.layer_slot = slots_of(plan)
        plans = [plan.layers[layer - 1] for layer in self.sampled_layers()]
        self.max_active = np.array([p.max_active for p in plans] or [0], dtype=np.int64)
        self.predict_probes = plan.predict_probes
        self.predict_max_active = np.array([p.predict_max_active for p in plans] or [0], dtype=np.int64)
        if len(self.hashes) != int((self.layer_slot >= 0).sum()) or len(self.tables) != len(self.hashes):
            raise ValueError("one hash family and one table set are needed per sampled layer")
        self.featurizer: TextFeaturizer | None = None
        """engine.text.TextFeaturizer of a model trained on text (it turns a query into this model's features)."""
        self.label_names: LabelNames | None = None
        """engine.text.LabelNames: label i's name, when the training set had names."""
        self.serve_tables = default_serve_tables(self.layer_slot, [w.shape[0] for w in self.weights])
        if serve_tables is not None:
            serve_tables = np.asarray(serve_tables, dtype=np.bool_)
            if serve_tables.shape != self.serve_tables.shape:
                raise ValueError(f"serve_tables must have one entry per layer ({self.depth}), got {serve_tables.shape}")
            self.serve_tables = serve_tables & (self.layer_slot >= 0)
        self.serving_report: dict = {}
        """How `calibrate_serving` chose `serve_tables` (empty: the width rule alone)."""
        self._hub_pack: _HubPack | None = None
        """What `_hub_arrays` made last."""

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def initialize(cls, config: SlideConfig, num_features: int, num_labels: int) -> SlideModel:
        """Random weights N(0, init_std), zero biases (output biases -log(num_labels) with the sigmoid loss: each
        label's first probability about 1 / num_labels, not 1/2), hash functions drawn and tables built from
        `seed`."""
        if num_features < 1 or num_labels < 1:
            raise ValueError("a model needs at least one feature and one label")
        config = concrete(config, num_labels)
        rng = np.random.default_rng(config.seed)
        widths = layer_widths(config, num_features, num_labels)
        dtype = weight_storage(config)
        weights = [_random_layer(rng, num_features, widths[1], config.model.init_std, dtype, bias=False)]
        for layer in range(1, len(widths) - 1):
            weights.append(
                _random_layer(rng, widths[layer + 1], widths[layer] + 1, config.model.init_std, dtype, bias=True)
            )
        if config.model.loss == "sigmoid":
            bias = np.full((1, 1), -np.log(num_labels), np.float32)
            weights[-1][:, -1] = to_bfloat16(bias)[0, 0] if dtype == np.uint16 else bias[0, 0]
        plan = resolve(config, num_features, num_labels)
        sampled = [p for p in plan.layers if p.sampled]
        hashes = [lsh.draw_hash_functions(config, p.inputs, p.neurons, rng) for p in sampled]
        tabs = [
            tables.empty_tables(hf.n_tables, p.neurons, hf.num_buckets, p.inputs, p.hub_neurons, p.predict_hubs)
            for p, hf in zip(sampled, hashes, strict=True)
        ]
        model = cls(
            config, num_features, num_labels, tuple(weights), np.zeros(widths[1], dtype=np.float32), hashes, tabs
        )
        for p in sampled:
            model.rehash_layer(p.layer, round_id=0)
        return model

    @property
    def depth(self) -> int:
        """Number of weight layers (input layer included)."""
        return len(self.weights)

    @property
    def plan(self) -> Resolved:
        """The concrete per-layer values the model runs with: the config resolved for its shape (engine.resolve),
        with each sampled layer's K, L, buckets, hubs and caps as its hash functions, tables and arrays hold them
        (a model read from a snapshot keeps the values it was built with)."""
        plan = resolve(self.config, self.num_features, self.num_labels)
        layers = list(plan.layers)
        for layer in self.sampled_layers():
            slot = int(self.layer_slot[layer])
            hf, tb = self.hashes[slot], self.tables[slot]
            layers[layer - 1] = dataclasses.replace(
                layers[layer - 1],
                neurons=int(self.weights[layer].shape[0]),
                hash_k=hf.k,
                hash_l=hf.n_tables,
                buckets=hf.num_buckets,
                max_active=int(self.max_active[slot]),
                predict_max_active=int(self.predict_max_active[slot]),
                hub_neurons=int(tb.hubs.shape[0]),
                predict_hubs=int(tb.serve_hubs.shape[0]),
            )
        return dataclasses.replace(plan, layers=tuple(layers), predict_probes=self.predict_probes)

    def sampled_layers(self) -> list[int]:
        return [int(layer) for layer in np.flatnonzero(self.layer_slot >= 0)]

    def float_weights(self, layer: int) -> np.ndarray:
        """W[layer] as float32: the array itself for float32 storage, a decoded copy of bfloat16."""
        w = self.weights[layer]
        return from_bfloat16(w) if w.dtype == np.uint16 else w

    def row_norms(self, layer: int) -> np.ndarray:
        """float32 (out,): the L2 norm of each neuron's weights (bias excluded), for layers >= 1."""
        norms = np.empty(self.weights[layer].shape[0], dtype=np.float32)
        row_norms(self.weights[layer], norms)
        return norms

    # ---- hashing --------------------------------------------------------------------------------
    def rehash_layer(
        self,
        layer: int,
        round_id: int,
        rows: np.ndarray | None = None,
        new_functions: np.random.Generator | None = None,
        serving_hubs: bool = True,
    ) -> int:
        """Re-insert neurons of a sampled layer into their current buckets; returns how many were hashed.

        rows: the neurons to rehash (None = all). new_functions: draw new hash functions from this rng
        first (a rebuild), which rehashes every neuron. serving_hubs: re-pick the serving hubs too (a
        trainer leaves them to `Trainer.refresh_serving_hubs`, before it evaluates or publishes).
        """
        slot = int(self.layer_slot[layer])
        w = self.weights[layer]
        if new_functions is not None:
            self.hashes[slot] = lsh.draw_hash_functions(self.config, w.shape[1] - 1, w.shape[0], new_functions)
            rows = None
        hf, tb = self.hashes[slot], self.tables[slot]
        if rows is None:
            total = np.empty(w.shape[1] - 1, dtype=np.float64)
            column_sums(w, total)
            tb.center[:] = total / w.shape[0]
            lsh.hash_matrix(w, hf, center=tb.center, out=tb.codes)
            tb.inserted[:] = round_id
            count = w.shape[0]
        else:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size:
                tb.codes[:, rows] = lsh.hash_matrix(w, hf, rows, center=tb.center)
                tb.inserted[rows] = round_id
            count = int(rows.size)
        tables.rebuild(
            tb, hf.num_buckets, self.config.sampling.bucket_size, self.config.sampling.insertion, hf.seed, round_id
        )
        self.update_hubs(layer, serving=serving_hubs)
        if layer == self.depth - 1:
            labels.drop_retired_from_tables(self)  # out of the buckets and the hubs
        return count

    def update_hubs(
        self, layer: int, training: bool = True, serving: bool = True, center: np.ndarray | None = None
    ) -> None:
        """Pick the layer's hubs (training): the neurons scoring highest on its mean input (`center`,
        default the tables' query_center); and its serving hubs (serving): half of the configured count the
        same way, the rest the largest weight norms.

        Picking only the serving hubs leaves the training run unchanged, so refreshing what a snapshot
        serves never changes what training computes.
        """
        tb = self.tables[int(self.layer_slot[layer])]
        n_train = tb.hubs.shape[0] if training else 0
        n_serve = tb.serve_hubs.shape[0] if serving else 0
        if n_train == 0 and n_serve == 0:
            return
        query = np.ascontiguousarray(tb.query_center if center is None else center, dtype=np.float32)
        static = np.empty(self.weights[layer].shape[0], dtype=np.float32)
        row_scores(self.weights[layer], query, static)
        if n_train:
            tb.hubs[:] = np.sort(_top(static, tb.hubs.shape[0])).astype(np.int32)
        if n_serve:
            # calibration grows the auto count by long rows only (see _serve_hub_counts)
            plain = lsh.resolve_serve_hubs(self.config, static.shape[0]) or n_serve
            by_score = _top(static, min(n_serve, plain) // 2)
            norms = self.row_norms(layer)
            longest = _top(norms, n_serve)
            longest = longest[np.argsort(-norms[longest], kind="stable")]
            extra = longest[~np.isin(longest, by_score)][: n_serve - by_score.shape[0]]
            tb.serve_hubs[:] = np.sort(np.concatenate([by_score, extra])).astype(np.int32)

    # ---- labels after training ----------------------------------------------------------------
    def add_labels(self, examples_csr, names) -> np.ndarray:
        """Add one output label per name, its row imprinted from its example points (one CSR point set per name:
        a (indptr, indices, values) triple or a scipy CSR matrix) and inserted into every hash table, so the
        next prediction can return it. Returns the new ids (after the existing ones). See engine.labels."""
        return labels.add_labels(self, examples_csr, names)

    def retire_labels(self, ids) -> np.ndarray:
        """Retire labels: never predicted again in any mode, removed from the buckets. Returns those that
        were live. See engine.labels."""
        return labels.retire_labels(self, ids)

    def label_status(self) -> list[str]:
        """`live` or `retired` for every label."""
        return labels.label_status(self)

    # ---- prediction ---------------------------------------------------------------------------
    def predict(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        values: np.ndarray,
        k: int = 5,
        mode: PredictMode = "auto",
        probes: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k labels int32 (n, k) and raw scores float32 (n, k) of n sparse points (CSR arrays).

        `lsh` scores only the output neurons the hash tables return (rows with fewer candidates than
        k are padded with -1 / -inf); `exact` scores every label; `auto` (the default) uses a layer's
        tables where `serve_tables` says so (wide layers whose tables recall the exact top-5, see
        `calibrate_serving`) and scores every neuron elsewhere: `resolve_mode` or `predict_with_stats`
        say which mode answered. Scores are output-layer logits, the same number for a label in every
        mode. probes: multi-probe buckets per table where tables are used (None = the config's
        predict_probes): more candidates, higher recall of the exact top-k.
        """
        labels, scores, _, _ = self.predict_with_stats(indptr, indices, values, k, mode, probes)
        return labels, scores

    def resolve_mode(self, mode: PredictMode = "auto") -> tuple[np.ndarray, str]:
        """(use_tables bool (depth,), the mode that answers: `lsh` when any layer uses its tables, else `exact`)."""
        if mode not in PREDICT_MODES:
            raise ValueError(f"mode must be one of {', '.join(PREDICT_MODES)}; got {mode!r}")
        if mode == "auto":
            use = self.serve_tables.copy()
        else:
            use = (self.layer_slot >= 0) & (mode == "lsh")
        return use, ("lsh" if use.any() else "exact")

    def predict_with_stats(
        self, indptr, indices, values, k: int = 5, mode: PredictMode = "auto", probes: int | None = None
    ) -> Predictions:
        """As `predict`, plus int64 (n,): how many output neurons were scored for each point, and the mode
        that answered (see `resolve_mode`)."""
        probes = self.predict_probes if probes is None else int(probes)
        if not 0 <= probes <= 64 or (probes and self.config.sampling.hash_family != "simhash"):
            raise ValueError(f"probes must be in [0, 64] (and 0 unless the hash family is simhash), got {probes}")
        indptr, indices, values = self._inputs(indptr, indices, values)
        use_tables, used = self.resolve_mode(mode)
        return self._predict(indptr, indices, values, k, use_tables, used, probes)

    def last_hidden(self, indptr, indices, values) -> np.ndarray:
        """float32 (n, width): the last hidden layer's activations of n sparse points (CSR arrays), after the input
        normalisation the config asks for, every neuron of every hidden layer computed (sampled ones too), as
        `exact` prediction computes them (kernels.inference.exact_hidden); never negative (ReLU)."""
        indptr, indices, values = self._inputs(indptr, indices, values)
        n = indptr.shape[0] - 1
        last = np.empty((n, self.weights[-1].shape[1] - 1), np.float32)
        if n == 0:
            return last
        scratch = self._take_scratch(self.predict_probes)
        try:
            hid = scratch[1]
            n_chunks = max(1, min(n, numba.get_num_threads(), hid[0].shape[0]))
            last_hidden_batch(
                read_only(indptr),
                read_only(indices),
                read_only(values),
                read_only(self.kernel_layers()),
                hid,
                n_chunks,
                last,
            )
        finally:
            self._return_scratch(scratch)
        return last

    def _inputs(self, indptr, indices, values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Checked CSR arrays, rows scaled to unit norm when the config says so."""
        indptr, indices, values = check_csr(indptr, indices, values, self.num_features)
        if self.config.model.normalize_input:
            values = unit_rows(indptr, values)
        return indptr, indices, values

    def _predict(self, indptr, indices, values, k, use_tables, used, probes) -> Predictions:
        if not 1 <= int(k) <= min(_MAX_K, self.num_labels):
            raise ValueError(f"k must be in [1, {min(_MAX_K, self.num_labels)}], got {k}")
        n = indptr.shape[0] - 1
        out_labels = np.empty((n, int(k)), dtype=np.int32)
        out_scores = np.empty((n, int(k)), dtype=np.float32)
        n_scored = np.zeros(n, dtype=np.int64)
        if n == 0:
            return Predictions(out_labels, out_scores, n_scored, used)
        scratch = self._take_scratch(probes)
        try:
            _, hid, ids, lookup = scratch
            n_chunks = max(1, min(n, numba.get_num_threads(), lookup.tags.shape[0]))
            retrieval = Retrieval(probes, self.config.sampling.active_threshold, self.predict_max_active)
            hubs = self._block_hubs(use_tables)
            if hubs is not None:
                self._predict_hub_blocks(
                    indptr, indices, values, hubs, retrieval, scratch, n_chunks, out_labels, out_scores, n_scored
                )
                return Predictions(out_labels, out_scores, n_scored, used)
            run = predict_batch_serial if n <= _SERIAL_BELOW else predict_batch
            run(
                read_only(indptr),  # read-only, as from a memory map: one compiled version of the kernel
                read_only(indices),
                read_only(values),
                use_tables,
                read_only(self.kernel_layers()),
                read_only(self.kernel_tables(serving=True)),
                retrieval,
                hid,
                ids,
                lookup,
                n_chunks,
                TopK(out_labels, out_scores, n_scored),
            )
        finally:
            self._return_scratch(scratch)
        return Predictions(out_labels, out_scores, n_scored, used)

    def _block_hubs(self, use_tables: np.ndarray) -> np.ndarray | None:
        """The serving hubs of the output layer when it is the only layer scored from its tables and it has hubs (what
        predict_batch_hubs answers), else None."""
        out = self.depth - 1
        slot = int(self.layer_slot[out])
        if slot < 0 or not use_tables[out] or use_tables[:out].any():
            return None
        tb = self.tables[slot]
        hubs = tb.serve_hubs if tb.serve_hubs.shape[0] else tb.hubs
        return hubs if hubs.shape[0] else None

    def _hub_arrays(self, hubs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What predict_batch_hubs needs beside the output layer's hubs: int32 (labels,) each label's place in
        `hubs` (-1 for the others), and the hubs' rows packed in their order when the layer is read-only (a served
        model: nothing changes the rows under the copy; else no rows, and the kernel reads the layer). Made once
        per hub set (compared by value: calibration re-picks hubs in place) and, for the rows, per output layer."""
        w = self.weights[-1]
        made = self._hub_pack
        if (
            made is None
            or made.hubs.shape != hubs.shape
            or made.place.shape[0] != w.shape[0]
            or (made.hubs != hubs).any()
        ):
            place = np.full(w.shape[0], -1, np.int32)
            place[hubs] = np.arange(hubs.shape[0], dtype=np.int32)
            place.flags.writeable = False
            made = _HubPack(None, hubs.copy(), place, np.zeros((0, w.shape[1]), w.dtype))
        packed = not w.flags.writeable
        if packed and made.layer is not w:
            rows = np.ascontiguousarray(w[hubs])
            rows.flags.writeable = False
            made = made._replace(layer=w, rows=rows)
        self._hub_pack = made
        return made.place, (made.rows if packed and made.layer is w else np.zeros((0, w.shape[1]), w.dtype))

    def _predict_hub_blocks(
        self, indptr, indices, values, hubs, retrieval, scratch, n_chunks, labels, scores, n_scored
    ) -> None:
        """predict_batch's answers through predict_batch_hubs, _HUB_BLOCK points at a time (a few points without
        threads)."""
        _, hid, ids, lookup = scratch
        layers = read_only(self.kernel_layers())
        kt = self.kernel_tables(serving=True)
        slot = int(self.layer_slot[-1])
        no_hubs = tuple(np.zeros(0, np.int32) if s == slot else h for s, h in enumerate(kt.hubs))
        tabs = read_only(kt._replace(hubs=no_hubs))
        hub_group = HubRows(read_only(hubs), *(read_only(a) for a in self._hub_arrays(hubs)))
        n = indptr.shape[0] - 1
        serial = n <= _SERIAL_BELOW
        hidden = last_hidden_batch_serial if serial else last_hidden_batch
        run = predict_batch_hubs_serial if serial else predict_batch_hubs
        block = min(n, _HUB_BLOCK)
        last = np.empty((block, self.weights[-1].shape[1] - 1), np.float32)
        hub_scores = np.empty((block, hubs.shape[0]), np.float32)
        for start in range(0, n, block):
            stop = min(n, start + block)
            points = read_only(indptr[start : stop + 1]), read_only(indices), read_only(values)
            hidden(*points, layers, hid, n_chunks, last[: stop - start])
            run(
                last[: stop - start],
                layers,
                tabs,
                hub_group,
                retrieval,
                ids,
                lookup,
                n_chunks,
                hub_scores[: stop - start],
                TopK(labels[start:stop], scores[start:stop], n_scored[start:stop]),
            )

    def calibrate_serving(
        self,
        indptr,
        indices,
        values,
        y_indptr: np.ndarray | None = None,
        y_indices: np.ndarray | None = None,
        min_recall: float = AUTO_MIN_RECALL,
        max_p1_loss: float = AUTO_MAX_P1_LOSS,
    ) -> dict:
        """Choose `serve_tables` (what `auto` does) from how the tables answer on these points.

        A narrow layer (`lsh.is_wide_layer` false: exact scoring is cheap there) is always scored exactly.
        A wide one uses its tables if, with only its tables on, the top-5 recalls at least `min_recall` of
        the exact top-5 and, when labels (y CSR arrays) are given, P@1 is at most `max_p1_loss` below
        exact's. Returns (and keeps in `serving_report`) per layer: its mode, and the recall and P@1
        figures where measured.
        """
        indptr, indices, values = self._inputs(indptr, indices, values)
        n = indptr.shape[0] - 1
        k = min(_CALIBRATION_K, self.num_labels)
        chosen = np.zeros(self.depth, dtype=np.bool_)
        report: dict = {}
        exact = None
        for layer in self.sampled_layers():
            entry: dict = {"neurons": int(self.weights[layer].shape[0])}
            if lsh.is_wide_layer(self.weights[layer].shape[0]) and n > 0:
                if exact is None:
                    none = np.zeros(self.depth, dtype=np.bool_)
                    exact = self._predict(indptr, indices, values, k, none, "exact", self.predict_probes).labels
                only = np.zeros(self.depth, dtype=np.bool_)
                only[layer] = True
                labelled = y_indptr is not None and y_indices is not None
                if labelled:
                    entry["p_at_1_exact"] = precision_at_k(exact, y_indptr, y_indices, 1)
                counts = self._serve_hub_counts(layer)
                for count in counts:
                    self._set_serve_hubs(layer, count)
                    got = self._predict(indptr, indices, values, k, only, "lsh", self.predict_probes).labels
                    entry["recall_at_5"] = topk_recall(got, exact)
                    ok = entry["recall_at_5"] >= min_recall
                    if labelled:
                        entry["p_at_1_tables"] = precision_at_k(got, y_indptr, y_indices, 1)
                        ok = ok and entry["p_at_1_tables"] >= entry["p_at_1_exact"] - max_p1_loss
                    if ok:
                        break
                else:
                    self._set_serve_hubs(layer, counts[0])  # exact serves it: lsh asked for keeps the plain count
                entry["serve_hubs"] = int(self.tables[self.layer_slot[layer]].serve_hubs.shape[0])
                chosen[layer] = ok
            entry["mode"] = "lsh" if chosen[layer] else "exact"
            entry["points"] = int(n)
            report[str(layer)] = entry
        self.serve_tables = chosen
        self.serving_report = report
        return report

    def _serve_hub_counts(self, layer: int) -> list[int]:
        """The serving hub counts calibration tries on a wide layer, smallest first: with `predict.hubs` auto, the
        resolved count doubled until 1/SERVE_HUBS_MAX_SHARE of the layer (long rows crowd the exact top-5 as
        training goes on, and cosine buckets return them only when nearly aligned with the query); else as is."""
        n = int(self.weights[layer].shape[0])
        current = int(self.tables[self.layer_slot[layer]].serve_hubs.shape[0])
        if self.config.predict.hubs is not None or current == 0:
            return [current]
        count = lsh.resolve_serve_hubs(self.config, n)
        counts = [count]
        cap = max(count, n // SERVE_HUBS_MAX_SHARE)
        while count < cap:
            count = min(cap, 2 * count)
            counts.append(count)
        return counts

    def _set_serve_hubs(self, layer: int, count: int) -> None:
        """Give a sampled layer `count` serving hubs, re-picked from the current weights (see update_hubs)."""
        slot = int(self.layer_slot[layer])
        if self.tables[slot].serve_hubs.shape[0] != count:
            self.tables[slot] = self.tables[slot]._replace(serve_hubs=np.zeros(count, dtype=np.int32))
            self.update_hubs(layer, training=False)

    def kernel_layers(self) -> Layers:
        """The parameters as the kernels take them (kernels.groups.Layers)."""
        return Layers(self.weights, self.b0, self.layer_slot)

    def kernel_tables(self, serving: bool = False) -> KernelTables:
        """The hash functions, buckets and hubs as the kernels take them (kernels.groups.Tables; a dummy
        when no layer is sampled); `serving` gives each layer's serving hubs (its training hubs if it has none)."""
        if not self.hashes:
            return KernelTables(
                (np.zeros((1, 1), np.int32),),
                (np.ones((1, 1), np.float32),),
                (np.zeros(8, np.int64),),
                (np.zeros((1, 2), np.int64),),
                (np.zeros((1, 1), np.int32),),
                (np.zeros(0, np.int32),),
            )
        return KernelTables(
            tuple(h.idx for h in self.hashes),
            tuple(h.sign for h in self.hashes),
            tuple(h.params for h in self.hashes),
            tuple(t.offsets for t in self.tables),
            tuple(t.ids for t in self.tables),
            tuple(t.serve_hubs if serving and t.serve_hubs.shape[0] else t.hubs for t in self.tables),
        )

    def _take_scratch(self, probes: int) -> tuple:
        """Per-thread buffers for prediction with `probes` probes: (key, hid, ids, kernels.groups.Lookup),
        taken from a process-wide pool keyed by their shapes, so concurrent
        requests never share one and a new version of the same model reuses its predecessor's (~45 MB
        per request at 670k labels) instead of leaving the allocator a fresh set at every swap."""
        threads = numba.config.NUMBA_NUM_THREADS
        widths = tuple(w.shape[1] - 1 for w in self.weights[1:])
        cap = max(
            [
                min(
                    self.weights[layer].shape[0],
                    self.hashes[self.layer_slot[layer]].n_tables * (1 + probes) * self.config.sampling.bucket_size
                    + max(
                        self.tables[self.layer_slot[layer]].hubs.shape[0],
                        self.tables[self.layer_slot[layer]].serve_hubs.shape[0],
                    ),
                )
                for layer in self.sampled_layers()
            ]
            or [1]
        )
        n_max = max([self.weights[layer].shape[0] for layer in self.sampled_layers()] or [1])
        n_codes = max([h.idx.shape[0] for h in self.hashes] or [1])
        n_buckets = max([h.n_tables for h in self.hashes] or [1]) * (1 + probes)
        key = (threads, widths, cap, n_max, n_codes, n_buckets)
        with _SCRATCH_LOCK:
            free = _SCRATCH_POOL.get(key)
            if free:
                return free.pop()
        hid = tuple(np.zeros((threads, width), dtype=np.float32) for width in widths)
        lookup = Lookup(
            tags=np.zeros((threads, n_max), np.int64),
            counts=np.zeros((threads, cap), np.int32),
            gens=np.zeros(threads, np.int64),
            qmargins=np.zeros((threads, n_codes), np.float64),
            qcodes=np.zeros((threads, n_codes), np.int32),
            qbuck=np.zeros((threads, n_buckets), np.int32),
        )
        return (key, hid, np.zeros((threads, cap), np.int32), lookup)

    @staticmethod
    def _return_scratch(scratch: tuple) -> None:
        with _SCRATCH_LOCK:
            _SCRATCH_POOL.setdefault(scratch[0], []).append(scratch)


def default_serve_tables(layer_slot: np.ndarray, widths: list[int]) -> np.ndarray:
    """`auto`'s choice before any calibration: tables for the sampled layers too wide to score exactly
    cheaply (`lsh.is_wide_layer`), every neuron elsewhere."""
    return np.array(
        [slot >= 0 and lsh.is_wide_layer(int(w)) for slot, w in zip(layer_slot, widths, strict=True)], dtype=np.bool_
    )


def weight_storage(config: SlideConfig) -> type:
    """The dtype of a model's weight arrays: uint16 (bfloat16 bits) or float32, as config.model.weight_dtype says."""
    return np.uint16 if config.model.weight_dtype == "bfloat16" else np.float32


def _random_layer(rng: np.random.Generator, rows: int, cols: int, std: float, dtype: type, bias: bool) -> np.ndarray:
    """N(0, std) weights (a zero last column when bias), drawn a block of rows at a time (the same
    numbers as one draw) so that a bfloat16 layer never has a float32 copy in memory."""
    w: np.ndarray = np.empty((rows, cols), dtype=dtype)
    for start in range(0, rows, _INIT_ROWS):
        block = rng.standard_normal((min(rows, start + _INIT_ROWS) - start, cols), dtype=np.float32)
        block *= np.float32(std)
        if bias:
            block[:, -1] = 0.0
        w[start : start + block.shape[0]] = to_bfloat16(block) if dtype == np.uint16 else block
    return w


def _top(values: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m largest values (any order)."""
    if m >= values.shape[0]:
        return np.arange(values.shape[0])
    return np.argpartition(-values, m - 1)[:m] if m > 0 else np.zeros(0, dtype=np.int64)


def layer_widths(config: SlideConfig, num_features: int, num_labels: int) -> list[int]:
    return [int(num_features), *hidden_widths(config, num_labels), int(num_labels)]


def slots_of(plan: Resolved) -> np.ndarray:
    """int64 (depth,): hash-table slot of each weight layer, -1 for dense layers and the input layer."""
    slots = np.full(len(plan.layers) + 1, -1, dtype=np.int64)
    sampled = plan.sampled_layers()
    slots[sampled] = np.arange(len(sampled))
    return slots


def layer_slots(config: SlideConfig, num_labels: int) -> np.ndarray:
    """slots_of the config's plan for this many labels (which layers are sampled needs no other shape)."""
    return slots_of(resolve(config, 1, num_labels))


def check_csr(indptr, indices, values, num_features: int):
    """Validate and convert CSR arrays once, at the boundary; the kernels trust them afterwards."""
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if indptr.ndim != 1 or indptr.shape[0] < 1 or indptr[0] != 0:
        raise ValueError("indptr must be a 1-d array starting at 0")
    if np.any(np.diff(indptr) < 0) or indptr[-1] != indices.shape[0]:
        raise ValueError("indptr must be non-decreasing and end at len(indices)")
    if indices.shape != values.shape or indices.ndim != 1:
        raise ValueError("indices and values must be 1-d arrays of the same length")
    if indices.size and (indices.min() < 0 or indices.max() >= num_features):
        bad = int(indices[(indices < 0) | (indices >= num_features)][0])
        raise ValueError(f"feature index {bad} is out of range [0, {num_features})")
    if values.size and not np.all(np.isfinite(values)):
        raise ValueError("feature values must be finite")
    return indptr, indices, values
