"""Dynamic layer-wise top-k for ReLU MLPs: per layer and decode batch size, how many neurons to keep.

At decode the MLP router's scores are combined over the batch (``selection.batch_neuron_scores``)
and the top-k neurons are computed once for the whole batch. The union of the neurons the batch truly
needs grows with the batch size, so k must too. For every layer and batch size the calibration picks
the smallest k, a multiple of ``granularity`` (full kernel tiles), whose selection recovers
``target_recall`` of that union on average over batches drawn from held-out sequences: sequences the
router was not trained on (the validation split of router training, reproduced from the router's
metadata, plus any store rows training did not use). When no k below the full width meets the
target, k is the full width and the entry says so (``at_full_width``); nothing is capped silently.

The table lives with the router bundle, beside the MLP routers it was fitted for::

    <bundle>/mlp/calibration.json   the table + metadata (store, router files and hashes, settings)
    <bundle>/mlp/calibration.csv    one row per (layer, batch size)
    <bundle>/mlp/calibration.png    density vs layer, one line per batch size

This module imports torch, numpy and json only (plus the Lightning-free store and bundle readers):
the decoding engine calls ``load_calibration(bundle).keep(layer, batch_size)``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import polar_sparsity
from polar_sparsity.data.store import ActivationStore, split_by_sequence
from polar_sparsity.evaluation.results import file_digest
from polar_sparsity.reporting import write_json_atomic
from polar_sparsity.routers.bundle import LoadedRouter, kind_dir, load_routers, router_path
from polar_sparsity.schema import PAPER_CALIBRATION_BATCH_SIZES, check_calibration
from polar_sparsity.sparsity.cost_table import CostTable
from polar_sparsity.sparsity.selection import batch_neuron_scores, topk_mask

CALIBRATION_JSON = "calibration.json"
CALIBRATION_CSV = "calibration.csv"
CALIBRATION_PNG = "calibration.png"
FORMAT = 1

_SCORE_CHUNK_ROWS = 8192  # router inputs scored per forward pass
_GATHER_ELEMENTS = 1 << 26  # (batches x batch size x neurons) logits gathered at once
_SORT_ROWS = 4096  # batches sorted at once (each a row of F scores)


class CalibrationError(RuntimeError):
    """A calibration that cannot run (bad inputs) or a table that is corrupt or belongs elsewhere."""


NO_COST_TABLE = (
    "calibrate.objective=latency needs MLP latencies per (batch size, k): pass calibrate.cost_table=PATH "
    "(a CSV with columns batch_size,k,latency_us,dense_us, written by a GPU calibration)"
)


@dataclass(frozen=True)
class CalibrationSettings:
    """What the calibration fits; validated on construction (before any work starts)."""

    batch_sizes: tuple[int, ...] = tuple(PAPER_CALIBRATION_BATCH_SIZES)
    target_recall: float = 0.99
    granularity: int = 128  # k is a multiple of this (or the full width)
    # Random batches per batch size (to fit on, and as many again to check on): enough to draw every
    # held-out row about once, at least ``batches`` and at most ``max_batches``.
    batches: int = 128
    check_fraction: float = 0.25  # share of the held-out sequences kept back to check the fitted k
    seed: int = 0
    weight_bytes: int = 2  # bytes per MLP weight when reporting bytes read per step (fp16/bf16: 2)
    max_batches: int = 4096
    # "recall": smallest k meeting target_recall (paper). "latency": largest k whose measured sparse MLP
    # latency (cost_table) is at most latency_budget x the dense MLP's at that batch size.
    objective: str = "recall"
    latency_budget: float = 0.5

    def __post_init__(self) -> None:
        if self.objective not in ("recall", "latency"):
            raise ValueError(f"calibrate.objective={self.objective!r} must be 'recall' or 'latency'")
        if not 0.0 < self.latency_budget <= 1.0:
            raise ValueError(f"calibrate.latency_budget={self.latency_budget} must be in (0, 1]")
        check_calibration(
            list(self.batch_sizes),
            self.target_recall,
            self.granularity,
            self.batches,
            self.check_fraction,
            self.weight_bytes,
            self.max_batches,
        )
        object.__setattr__(self, "batch_sizes", tuple(sorted(int(b) for b in self.batch_sizes)))


@dataclass(frozen=True)
class CalibrationEntry:
    """The calibrated k of one layer at one batch size, and what it buys."""

    layer: int
    batch_size: int
    k: int  # neurons kept for the whole batch
    recall: float  # mean over the fitting batches of |kept & union| / |union|
    check_recall: float  # the same k on batches from held-out sequences the fit did not see
    density: float  # k / ffn_dim
    union_density: float  # mean |union of truly active neurons| / ffn_dim (no router involved)
    at_full_width: bool  # the target is not met below the full width: k = ffn_dim
    mlp_bytes: int  # MLP weight bytes read per decode step at this k (up rows + down columns)
    # objective=latency only: the cost table's sparse MLP latency at this k, and whether even the
    # smallest k exceeds the budget (then k is the smallest candidate).
    latency_us: float | None = None
    over_budget: bool = False


@dataclass
class CalibrationTable:
    """Per (layer, batch size) entries and the metadata of the fit; ``keep`` is what decoding asks."""

    entries: dict[tuple[int, int], CalibrationEntry]
    ffn_dim: int
    target_recall: float
    granularity: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({b for _, b in self.entries}))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.entries}))

    def calibrated_batch_size(self, batch_size: int) -> int:
        """The nearest calibrated batch size at or above ``batch_size``; the largest one beyond the range.

        Beyond the largest calibrated batch size the union is larger than calibrated for, so the k
        of the largest one can fall short of the target there: calibrate larger batch sizes to cover it.
        """
        if batch_size <= 0:
            raise ValueError(f"batch size {batch_size} must be a positive integer")
        at_or_above = [b for b in self.batch_sizes if b >= batch_size]
        return at_or_above[0] if at_or_above else self.batch_sizes[-1]

    def entry(self, layer: int, batch_size: int) -> CalibrationEntry:
        """The record used for ``batch_size`` (see ``calibrated_batch_size``)."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in the calibration table (layers {list(self.layers)})")
        return self.entries[(layer, self.calibrated_batch_size(batch_size))]

    def keep(self, layer: int, batch_size: int) -> int:
        """Neurons to keep in ``layer`` for a decode batch of ``batch_size`` sequences.

        The k of the nearest calibrated batch size at or above ``batch_size``; beyond the largest
        calibrated batch size, the largest one's k (which may then miss the target).
        """
        return self.entry(layer, batch_size).k

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(self.entries[key]) for key in sorted(self.entries)]

    def summary_rows(self) -> list[dict[str, Any]]:
        """Per batch size over layers: mean k and union densities, worst recalls, full-width layers."""
        out = []
        for b in self.batch_sizes:
            es = [self.entries[(layer, b)] for layer in self.layers]
            sparse = [e for e in es if not e.at_full_width]
            out.append(
                {
                    "batch_size": b,
                    "mean_density": float(np.mean([e.density for e in es])),
                    "mean_union_density": float(np.mean([e.union_density for e in es])),
                    "min_recall": min((e.recall for e in sparse), default=float("nan")),
                    "min_check_recall": min((e.check_recall for e in sparse), default=float("nan")),
                    "full_width_layers": len(es) - len(sparse),
                    "mlp_mbytes": sum(e.mlp_bytes for e in es) / 1e6,
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "ffn_dim": self.ffn_dim,
            "target_recall": self.target_recall,
            "granularity": self.granularity,
            "batch_sizes": list(self.batch_sizes),
            "layers": list(self.layers),
            "entries": self.rows(),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any], source: str = "calibration table") -> CalibrationTable:
        try:
            if payload["format"] != FORMAT:
                raise CalibrationError(
                    f"{source} has format {payload['format']}, this version reads {FORMAT}"
                )
            entries = {}
            for raw in payload["entries"]:
                entry = CalibrationEntry(**raw)
                entries[(entry.layer, entry.batch_size)] = entry
            table = cls(
                entries=entries,
                ffn_dim=int(payload["ffn_dim"]),
                target_recall=float(payload["target_recall"]),
                granularity=int(payload["granularity"]),
                meta=dict(payload.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CalibrationError(f"{source} is corrupt ({type(error).__name__}: {error})") from error
        missing = [
            (layer, b) for layer in table.layers for b in table.batch_sizes if (layer, b) not in entries
        ]
        if not entries or missing:
            raise CalibrationError(
                f"{source} is corrupt: missing (layer, batch size) entries {missing or 'all'}"
            )
        return table


# --- loading and saving ----------------------------------------------------------------------------


def calibration_path(bundle_dir: str | Path) -> Path:
    return kind_dir(bundle_dir, "mlp") / CALIBRATION_JSON


def load_calibration(bundle_dir: str | Path, model: str | None = None) -> CalibrationTable | None:
    """The bundle's MLP calibration table; None when it has none.

    Raises ``CalibrationError`` when the file is corrupt, was fitted for another model than
    ``model`` (when given), or names router files the bundle no longer has.
    """
    path = calibration_path(bundle_dir)
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CalibrationError(
            f"{path} is not readable JSON ({error}); re-run `python calibrate.py`"
        ) from error
    table = CalibrationTable.from_dict(payload, source=str(path))
    fitted_for = table.meta.get("model")
    if model is not None and fitted_for != model:
        raise CalibrationError(
            f"{path} was calibrated for model {fitted_for!r}, not {model!r}; point paths.routers at "
            f"{model}'s bundle or re-run `python calibrate.py model={model}`"
        )
    gone = [name for name in table.meta.get("routers", {}) if not (Path(bundle_dir) / name).exists()]
    if gone:
        raise CalibrationError(f"{path} was fitted for router files the bundle no longer has: {gone}")
    return table


def save_calibration(table: CalibrationTable, bundle_dir: str | Path) -> Path:
    """Write the table as JSON through a temporary name (the CSV and plot are the runner's)."""
    return write_json_atomic(calibration_path(bundle_dir), table.to_dict())


# --- which rows: sequences the routers were not trained on ----------------------------------------


def require_mlp_activity(store: ActivationStore) -> None:
    """Refuse a store of a gated-MLP model: it has no exact zeros, so no neuron activity."""
    if not store.has_mlp:
        raise CalibrationError(
            f"the store at {store.root} holds no MLP activity: its model's MLP is "
            f"{store.geometry.mlp_kind.value} (no exact zeros to calibrate against). The MLP top-k "
            f"calibration is for ReLU models such as OPT"
        )


def check_routers(store: ActivationStore, routers: dict[int, LoadedRouter]) -> None:
    """Refuse routers trained on another store (their held-out sequences are unknown) or width."""
    manifest = store.manifest
    for layer, router in routers.items():
        trained_on = router.meta.get("store", {})
        wrong = {
            key: (trained_on.get(key), manifest.get(key))
            for key in ("model", "data", "rows")
            if trained_on.get(key) != manifest.get(key)
        }
        if wrong:
            raise CalibrationError(
                f"the MLP router of layer {layer} was trained on another store ({wrong}: router's vs "
                f"{store.root}'s). Calibrate against the store it was trained on, so its held-out "
                f"sequences are known"
            )
        if router.num_outputs != store.geometry.ffn_dim:
            raise CalibrationError(
                f"the MLP router of layer {layer} scores {router.num_outputs} neurons; the store's model "
                f"has {store.geometry.ffn_dim}"
            )


def held_out_rows(store: ActivationStore, router_meta: dict[str, Any]) -> np.ndarray:
    """Store rows whose sequences the router never trained on: its validation split + unused rows.

    The split is the one router training made (``store.split_by_sequence`` with the recorded
    seed and validation fraction); the recorded row counts confirm it was reproduced exactly.
    """
    train = router_meta.get("train", {})
    layer = router_meta.get("layer")
    if "train_rows" not in train or "val_rows" not in train or "seed" not in train:
        raise CalibrationError(
            f"the MLP router of layer {layer} records no training split (train rows, validation rows, "
            f"seed): retrain it with this version of train.py"
        )
    used = int(train["train_rows"]) + int(train["val_rows"])
    # Bundles from before the fraction was recorded used train.py's default, 0.1; the check below
    # refuses them if that guess does not reproduce the recorded split.
    val_fraction = float(train.get("val_fraction") or 0.1)
    _, val = split_by_sequence(np.asarray(store.sequence_ids()[:used]), val_fraction, int(train["seed"]))
    if len(val) != int(train["val_rows"]):
        raise CalibrationError(
            f"cannot reproduce the training split of the MLP router of layer {layer}: "
            f"val_fraction={val_fraction}, seed={train['seed']} hold out {len(val)} rows, the router "
            f"records {train['val_rows']}; retrain it with this version of train.py"
        )
    return np.concatenate([val, np.arange(used, store.num_samples)])


def split_fit_check(
    rows: np.ndarray, sequence_ids: np.ndarray, check_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out rows -> (fit rows, check rows), whole sequences on each side (the training split's
    rule, ``store.split_by_sequence``, applied to the held-out rows)."""
    held_out = sequence_ids[rows]
    sequences = len(np.unique(held_out))
    if sequences < 2:
        raise CalibrationError(
            f"the routers' held-out rows hold {sequences} sequence(s); fitting and checking need at "
            f"least 2 (collect more samples, or train with a larger train.val_fraction)"
        )
    fit, check = split_by_sequence(held_out, check_fraction, seed)
    return rows[fit], rows[check]


def draw_batches(
    rows: np.ndarray, sequence_ids: np.ndarray, batch_size: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """(count, batch_size) store rows: decode batches, one token from each of ``batch_size`` sequences.

    A decode batch holds different sequences, so tokens come from distinct sequences while there
    are enough; a batch size beyond the number of sequences draws distinct rows at random instead.
    """
    if batch_size > len(rows):
        raise CalibrationError(
            f"batch size {batch_size} needs {batch_size} held-out rows, but only {len(rows)} are there: "
            f"collect more samples or drop it from calibrate.batch_sizes"
        )
    order = np.argsort(sequence_ids[rows], kind="stable")
    by_sequence = rows[order]
    sequences, starts, lengths = np.unique(sequence_ids[by_sequence], return_index=True, return_counts=True)
    batches = np.empty((count, batch_size), dtype=np.int64)
    for i in range(count):
        if batch_size <= len(sequences):
            chosen = rng.choice(len(sequences), size=batch_size, replace=False)
            offsets = (rng.random(batch_size) * lengths[chosen]).astype(np.int64)
            batches[i] = by_sequence[starts[chosen] + offsets]
        else:
            batches[i] = rng.choice(rows, size=batch_size, replace=False)
    return batches


# --- the fit ---------------------------------------------------------------------------------------


def candidate_ks(ffn_dim: int, granularity: int) -> np.ndarray:
    """Multiples of ``granularity`` below the full width, then the full width."""
    return np.append(np.arange(granularity, ffn_dim, granularity), ffn_dim)


# (batch scores, union) pairs, each (batches in the chunk, F): a batch size's batches in pieces.
Chunks = Sequence[tuple[torch.Tensor, torch.Tensor]]


class LayerBatches:
    """One layer's router logits (computed once) and active bits for the rows a calibration draws."""

    def __init__(
        self,
        rows: np.ndarray,
        logits: torch.Tensor,
        packed: np.ndarray,
        unpack: Callable[[np.ndarray], np.ndarray],
    ):
        """``rows`` sorted store rows; ``logits`` (rows, F) and ``packed`` (rows, F/8 bytes) in that order."""
        self.rows, self.logits, self.packed, self._unpack = rows, logits, packed, unpack
        self.ffn_dim = logits.shape[-1]

    @classmethod
    def from_store(
        cls, store: ActivationStore, layer: int, router: LoadedRouter, rows: np.ndarray
    ) -> LayerBatches:
        """Score the (unique) ``rows`` with the router once and read their active bits."""
        rows = np.unique(rows)
        param = next(router.net.parameters())
        inputs = store.router_inputs(layer)
        chunks = []
        for start in range(0, len(rows), _SCORE_CHUNK_ROWS):
            x = store.as_tensor(inputs[rows[start : start + _SCORE_CHUNK_ROWS]])
            chunks.append(router.scores(x.to(param.device).float()).to(torch.float16))
        # float16 halves the memory; batch_neuron_scores sums the probabilities in float32.
        logits = torch.cat(chunks)
        return cls(rows, logits, np.asarray(store.mlp_active_packed(layer)[rows]), store.unpack_mlp)

    def _local(self, batches: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.rows, batches)

    def chunks(self, batches: np.ndarray) -> Chunks:
        """(batch scores, union) per bounded chunk of batches, both (chunk, F), computed once.

        Scores are ``batch_neuron_scores`` of the batch's router logits; the union marks neurons
        active for at least one token of the batch (bits OR-ed before unpacking).
        """
        per_chunk = max(1, min(_GATHER_ELEMENTS // (batches.shape[1] * self.ffn_dim), _SORT_ROWS))
        out = []
        for start in range(0, len(batches), per_chunk):
            local = self._local(batches[start : start + per_chunk])
            ored = np.bitwise_or.reduce(self.packed[local], axis=1)
            union = torch.from_numpy(self._unpack(ored)).to(self.logits.device)
            scores = batch_neuron_scores(self.logits[torch.from_numpy(local).to(self.logits.device)])
            out.append((scores, union))
        return out


def _per_batch_recall(hits: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """|kept & union| / |union|; a batch whose union is empty has recall 1 (nothing to miss)."""
    return torch.where(size > 0, hits / size.clamp(min=1), torch.ones_like(hits))


def recall_curve(scores: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """Mean over batches of the union recall of the top-k scores, for every k = 1..F at once.

    One sort per batch: the running count of union neurons down the ranking is |top-k & union|.
    """
    order = torch.argsort(scores, dim=-1, descending=True)
    hits = union.gather(-1, order).cumsum(-1, dtype=torch.float64)
    return _per_batch_recall(hits, union.sum(-1, keepdim=True, dtype=torch.float64)).mean(0)


def union_recall(scores: torch.Tensor, union: torch.Tensor, keep: int) -> float:
    """Mean over batches of |top-k & union| / |union| with the deployed rule (``topk_mask``)."""
    hits = (topk_mask(scores, keep) & union).sum(-1, dtype=torch.float64)
    return float(_per_batch_recall(hits, union.sum(-1, dtype=torch.float64)).mean())


def _mean(chunks: Chunks, measure: Callable[[torch.Tensor, torch.Tensor], Any]) -> Any:
    """Mean of a per-chunk mean over all batches (chunks weighted by their batch counts)."""
    total, count = 0.0, 0
    for scores, union in chunks:
        total = total + measure(scores, union) * len(scores)
        count += len(scores)
    return total / count


def fit_k(chunks: Chunks, target: float, granularity: int, ffn_dim: int) -> tuple[int, float]:
    """The smallest candidate k whose mean union recall (deployed rule) meets ``target``, and that recall.

    The sorted sweep ranks all candidates in one pass; ``topk_mask`` then confirms the choice (ties
    may order differently), moving up a candidate in the rare case it falls short. The full width
    always meets any target.
    """
    candidates = candidate_ks(ffn_dim, granularity)
    curve = _mean(chunks, lambda s, u: recall_curve(s, u).cpu().numpy())[candidates - 1]
    meets = curve >= target - 1e-12
    for k in candidates[int(np.argmax(meets)) if meets.any() else -1 :]:
        recall = _mean(chunks, lambda s, u, k=int(k): union_recall(s, u, k))
        if recall >= target or k == ffn_dim:
            return int(k), recall
    raise AssertionError("unreachable: the full width is always a candidate")


def calibrate_layer(
    layer_batches: LayerBatches,
    layer: int,
    fit: dict[int, np.ndarray],
    check: dict[int, np.ndarray],
    settings: CalibrationSettings,
    hidden_size: int,
    cost_table: CostTable | None = None,
) -> list[CalibrationEntry]:
    """Entries for one layer: per batch size, fit k on ``fit`` batches, then measure it on ``check``.

    objective=latency takes k from ``cost_table`` (largest grid k within the budget) and reports the
    recall it buys on the same fit batches.
    """
    ffn_dim = layer_batches.ffn_dim
    entries = []
    for batch_size in settings.batch_sizes:
        fit_chunks = layer_batches.chunks(fit[batch_size])
        latency_us, over_budget = None, False
        if settings.objective == "latency":
            if cost_table is None:
                raise CalibrationError(NO_COST_TABLE)
            ks = [int(k) for k in candidate_ks(ffn_dim, settings.granularity)]
            k, latency_us, over_budget = cost_table.pick_k(batch_size, ks, settings.latency_budget)
            recall = _mean(fit_chunks, lambda s, u, k=k: union_recall(s, u, k))
        else:
            k, recall = fit_k(fit_chunks, settings.target_recall, settings.granularity, ffn_dim)
        entries.append(
            CalibrationEntry(
                layer=layer,
                batch_size=batch_size,
                k=k,
                recall=recall,
                check_recall=_mean(
                    layer_batches.chunks(check[batch_size]), lambda s, u, k=k: union_recall(s, u, k)
                ),
                density=k / ffn_dim,
                union_density=_mean(fit_chunks, lambda s, u: float(u.float().mean())),
                at_full_width=k == ffn_dim,
                mlp_bytes=2 * k * hidden_size * settings.weight_bytes,
                latency_us=latency_us,
                over_budget=over_budget,
            )
        )
    return entries


def calibrate(
    bundle_dir: str | Path,
    store_root: str | Path,
    settings: CalibrationSettings,
    layers: Iterable[int] | None = None,
    device: str | torch.device = "cpu",
    model: str | None = None,
    on_layer: Callable[[int, float], None] | None = None,
    cost_table: CostTable | None = None,
) -> CalibrationTable:
    """Fit the table for ``layers`` (None: every MLP router in the bundle). Checks everything first.

    objective=latency needs ``cost_table`` covering every batch size and grid k of this model's width.

    ``on_layer(layer, seconds)`` is called after each layer (progress and timing).
    """
    store = ActivationStore(store_root)
    require_mlp_activity(store)
    routers = load_routers(
        bundle_dir,
        "mlp",
        layers=layers,
        device=device,
        model=model,
        dtype=torch.float32,
        weights=store.manifest.get("weights"),  # routers fitted on the store's own kind of weights
        geometry=store.geometry.as_dict(),
    )
    check_routers(store, routers)
    if settings.objective == "latency":
        if cost_table is None:
            raise CalibrationError(NO_COST_TABLE)
        ks = [int(k) for k in candidate_ks(store.geometry.ffn_dim, settings.granularity)]
        cost_table.check_covers(settings.batch_sizes, ks)
    sequence_ids = np.asarray(store.sequence_ids())
    entries: dict[tuple[int, int], CalibrationEntry] = {}
    timings = {}
    plans = {layer: _draw(store, router, sequence_ids, settings) for layer, router in routers.items()}
    for layer, router in routers.items():
        started = time.perf_counter()
        fit, check = plans[layer]
        drawn = np.concatenate([b.ravel() for b in (*fit.values(), *check.values())])
        layer_batches = LayerBatches.from_store(store, layer, router, drawn)
        for entry in calibrate_layer(
            layer_batches, layer, fit, check, settings, store.geometry.hidden_size, cost_table
        ):
            entries[(entry.layer, entry.batch_size)] = entry
        del layer_batches
        timings[layer] = round(time.perf_counter() - started, 3)
        if on_layer is not None:
            on_layer(layer, timings[layer])
    meta = _table_meta(bundle_dir, store, routers, settings, timings)
    if cost_table is not None and settings.objective == "latency":
        meta["cost_source"] = cost_table.source
    return CalibrationTable(
        entries=entries,
        ffn_dim=store.geometry.ffn_dim,
        target_recall=settings.target_recall,
        granularity=settings.granularity,
        meta=meta,
    )


def _draw(
    store: ActivationStore, router: LoadedRouter, sequence_ids: np.ndarray, settings: CalibrationSettings
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Fit and check batches of every batch size for one router (checked before any scoring)."""
    fit_rows, check_rows = split_fit_check(
        held_out_rows(store, router.meta), sequence_ids, settings.check_fraction, settings.seed
    )
    return plan_batches(fit_rows, check_rows, sequence_ids, settings, router.layer)


def plan_batches(
    fit_rows: np.ndarray,
    check_rows: np.ndarray,
    sequence_ids: np.ndarray,
    settings: CalibrationSettings,
    layer: int,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """{batch size: (count, batch size) rows} to fit on and to check on, seeded per layer and size."""
    fit, check = {}, {}
    for batch_size in settings.batch_sizes:
        rng = np.random.default_rng((settings.seed, layer, batch_size))
        for drawn, rows in ((fit, fit_rows), (check, check_rows)):
            count = min(settings.max_batches, max(settings.batches, math.ceil(len(rows) / batch_size)))
            drawn[batch_size] = draw_batches(rows, sequence_ids, batch_size, count, rng)
    return fit, check


def _table_meta(
    bundle_dir: str | Path,
    store: ActivationStore,
    routers: dict[int, LoadedRouter],
    settings: CalibrationSettings,
    timings: dict[int, float],
) -> dict[str, Any]:
    bundle = Path(bundle_dir)
    files = {}
    for layer in routers:
        path = router_path(bundle, "mlp", layer)
        files[str(path.relative_to(bundle))] = file_digest(path)
    return {
        "model": store.manifest["model"],
        "store": store.provenance(),
        "routers": files,
        "settings": {**asdict(settings), "batch_sizes": list(settings.batch_sizes)},
        "objective": settings.objective,
        "batch_rule": "selection.batch_neuron_scores (sum of sigmoid probabilities over the batch), top-k",
        "recall": "mean over batches of |kept & union of active| / |union|",
        "hidden_size": store.geometry.hidden_size,
        "layer_seconds": timings,
        "package_version": polar_sparsity.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def entries_by_batch(table: CalibrationTable, key: str) -> dict[int, list[float]]:
    """{batch size: [value per layer]} for plotting one field of the entries."""
    return {b: [getattr(table.entries[(layer, b)], key) for layer in table.layers] for b in table.batch_sizes}


def check_layers(table: CalibrationTable, layers: Sequence[int]) -> None:
    """Refuse a plan that needs layers the table has no k for."""
    missing = [layer for layer in layers if layer not in table.layers]
    if missing:
        raise CalibrationError(
            f"the calibration table has no k for layer(s) {missing} (it covers {list(table.layers)}); "
            f"re-run `python calibrate.py` after training those MLP routers"
        )
