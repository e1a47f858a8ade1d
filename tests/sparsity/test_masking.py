"""Masking hooks on every family's tiny random model: the right heads, groups and neurons are zeroed."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pytest
import torch

from polar_sparsity.models.families import MlpKind, family_for_config
from polar_sparsity.models.loading import cache_argument
from polar_sparsity.schema import Mode
from polar_sparsity.sparsity import SparsityPlan, apply_sparsity, check_plan, num_kept
from tests.helpers import TINY_ARCHITECTURES, tiny_model

FAMILIES = list(TINY_ARCHITECTURES)


class LinearRouter:
    """A stand-in for a bundle router: a fixed random linear map from the router input to unit logits."""

    def __init__(self, d: int, units: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.net = torch.nn.Linear(d, units)
        self.num_outputs = units

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _setup(name: str):
    _, model = tiny_model(name)
    adapter = family_for_config(model.config)
    return model, adapter, adapter.geometry(model.config)


def _routers(geometry, units: int, d_in: int) -> dict[int, LinearRouter]:
    return {layer: LinearRouter(d_in, units, seed=10 + layer) for layer in range(geometry.num_layers)}


def _router_input_dim(model, adapter) -> int:
    # Post-norm OPT's attention reads the layer input, whose width may differ from hidden_size.
    return adapter.attention(model, 0).k_proj.in_features


def _ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@contextmanager
def _record(module: torch.nn.Module, store: list, key: str = "args"):
    handle = module.register_forward_pre_hook(lambda _m, args: store.append(args[0].detach().clone()))
    try:
        yield
    finally:
        handle.remove()


def _full_plan(mode: Mode, model, adapter, geometry, **kwargs) -> SparsityPlan:
    d_in = _router_input_dim(model, adapter)
    mlp = geometry.mlp_kind == MlpKind.relu
    return SparsityPlan(
        mode=mode,
        head_routers=_routers(geometry, geometry.num_kv_heads, d_in),
        mlp_routers=_routers(geometry, geometry.ffn_dim, d_in) if mlp else {},
        mlp_topk=kwargs.pop("mlp_topk", 1.0 if mlp and mode == Mode.sparse else None),
        **kwargs,
    )


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", list(Mode))
def test_keeping_everything_is_bitwise_dense(name: str, mode: Mode) -> None:
    model, adapter, geometry = _setup(name)
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        plan = _full_plan(mode, model, adapter, geometry, attn_topk=1.0, dense_attn_layers=frozenset())
        with apply_sparsity(model, adapter, geometry, plan):
            sparse = model(ids).logits
    assert torch.equal(dense, sparse)


@pytest.mark.parametrize("name", FAMILIES)
def test_sparse_changes_the_output_and_hooks_are_removed(name: str) -> None:
    model, adapter, geometry = _setup(name)
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        with apply_sparsity(model, adapter, geometry, SparsityPlan(Mode.sparse_attn, attn_topk=0.5)):
            sparse = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(dense, sparse)
    assert torch.equal(dense, after)


def _check_unit_selection(before, after, scores, geometry, keep: int) -> None:
    """Kept units are bitwise untouched, dropped ones are zero, and the kept ones have the top scores."""
    b, t, _ = before.shape
    per_unit = geometry.group_size * geometry.head_dim
    units_before = before.reshape(b, t, geometry.num_kv_heads, per_unit)
    units_after = after.reshape(b, t, geometry.num_kv_heads, per_unit)
    kept = units_after.abs().amax(-1) > 0
    assert (kept.sum(-1) == keep).all()
    assert torch.equal(units_after[kept], units_before[kept])
    assert (units_after[~kept] == 0).all()
    expected = torch.topk(scores, keep, dim=-1).indices
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, expected, True))


@pytest.mark.parametrize("name", FAMILIES)
def test_oracle_keeps_top_norm_heads_or_groups(name: str) -> None:
    model, adapter, geometry = _setup(name)
    layer = 1
    before, after = [], []
    out_proj = adapter.attn_out_proj(model, layer)
    plan = SparsityPlan(Mode.sparse_attn, attn_topk=0.5)
    # Entered in order: `before` is registered ahead of the mask hook, `after` behind it.
    with (
        torch.no_grad(),
        _record(out_proj, before),
        apply_sparsity(model, adapter, geometry, plan),
        _record(out_proj, after),
    ):
        model(_ids())
    x = before[0]
    norms = x.reshape(*x.shape[:2], geometry.num_heads, geometry.head_dim).norm(dim=-1)
    # GQA: a group's score is its best head's norm.
    group = norms.reshape(*norms.shape[:2], geometry.num_kv_heads, geometry.group_size).amax(-1)
    _check_unit_selection(x, after[0], group, geometry, num_kept(0.5, geometry.num_kv_heads))


@pytest.mark.parametrize("name", FAMILIES)
def test_router_mode_keeps_router_top_units(name: str) -> None:
    model, adapter, geometry = _setup(name)
    layer = 1
    before, after, router_in = [], [], []
    out_proj, attention = adapter.attn_out_proj(model, layer), adapter.attention(model, layer)
    plan = _full_plan(Mode.sparse, model, adapter, geometry, attn_topk=0.3, mlp_topk=None)
    hook = attention.register_forward_pre_hook(
        lambda _m, args, kwargs: router_in.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True,
    )
    with torch.no_grad(), _record(out_proj, before):
        with apply_sparsity(model, adapter, geometry, plan), _record(out_proj, after):
            model(_ids())
        scores = plan.head_routers[layer].scores(router_in[0])
    hook.remove()
    _check_unit_selection(before[0], after[0], scores, geometry, num_kept(0.3, geometry.num_kv_heads))


@pytest.mark.parametrize("name", ["opt", "llama-gqa"])
def test_random_heads_are_seeded_and_counted(name: str) -> None:
    model, adapter, geometry = _setup(name)
    out_proj = adapter.attn_out_proj(model, 1)

    def kept_units(seed: int) -> torch.Tensor:
        after = []
        with (
            torch.no_grad(),
            apply_sparsity(
                model, adapter, geometry, SparsityPlan(Mode.random_attn, attn_topk=0.5, seed=seed)
            ) as controller,
            _record(out_proj, after),
        ):
            model(_ids(4, 16))
        x = after[0]
        assert controller.stats.attn_density() == pytest.approx(
            num_kept(0.5, geometry.num_kv_heads) / geometry.num_kv_heads
        )
        return x.reshape(*x.shape[:2], geometry.num_kv_heads, -1).abs().amax(-1) > 0

    first, again, other = kept_units(0), kept_units(0), kept_units(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # Different tokens get different subsets: the choice is per token, not per layer.
    assert len({tuple(row.tolist()) for row in first.reshape(-1, geometry.num_kv_heads)}) > 1


@pytest.mark.parametrize("name", ["opt", "llama-gqa"])
def test_layer_zero_stays_dense_by_default(name: str) -> None:
    model, adapter, geometry = _setup(name)
    before, after = [], []
    out_proj = adapter.attn_out_proj(model, 0)
    plan = SparsityPlan(Mode.sparse_attn, attn_topk=0.25)
    with (
        torch.no_grad(),
        _record(out_proj, before),
        apply_sparsity(model, adapter, geometry, plan),
        _record(out_proj, after),
    ):
        model(_ids())
    assert torch.equal(before[0], after[0])


@pytest.mark.parametrize("name", ["opt", "llama-gqa"])
def test_last_n_masks_only_the_last_positions(name: str) -> None:
    model, adapter, geometry = _setup(name)
    ids = _ids(2, 12)
    lengths = torch.tensor([12, 7])  # row 1 is right-padded after 7 tokens
    with torch.no_grad():
        dense = model(ids).logits
        plan = SparsityPlan(Mode.sparse_attn, attn_topk=0.25, last_n=3, dense_attn_layers=frozenset())
        with apply_sparsity(model, adapter, geometry, plan) as controller:
            controller.set_lengths(lengths)
            sparse = model(ids).logits
    for row, length in enumerate(lengths.tolist()):
        # Earlier positions cannot see later ones; positions past a row's end are padding.
        assert torch.equal(dense[row, : length - 3], sparse[row, : length - 3])
        assert not torch.allclose(dense[row, length - 3 : length], sparse[row, length - 3 : length])


def test_last_n_without_lengths_uses_the_tensor_end_and_decode_steps() -> None:
    model, adapter, geometry = _setup("llama-gqa")
    ids = _ids(1, 10)
    plan = SparsityPlan(Mode.sparse_attn, attn_topk=0.25, last_n=1)
    with torch.no_grad():
        dense = model(ids).logits
        with apply_sparsity(model, adapter, geometry, plan):
            sparse = model(ids).logits
            # A cached single-token decode step is the last position: it is masked.
            cache = model(ids[:, :-1], use_cache=True).past_key_values
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)  # the cache argument by its current name
                step = model(ids[:, -1:], **{cache_argument(model): cache}).logits
    assert torch.equal(dense[:, :-1], sparse[:, :-1])
    assert not torch.allclose(dense[:, -1], sparse[:, -1])
    torch.testing.assert_close(step[:, -1], sparse[:, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["opt", "opt-postnorm"])
def test_mlp_router_zeroes_non_selected_neurons(name: str) -> None:
    model, adapter, geometry = _setup(name)
    layer = 1
    before, after, router_in = [], [], []
    down = adapter.mlp_down_proj(model, layer)
    attention = adapter.attention(model, layer)
    plan = _full_plan(Mode.sparse, model, adapter, geometry, attn_topk=1.0, mlp_topk=0.25)
    hook = attention.register_forward_pre_hook(
        lambda _m, args, kwargs: router_in.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True,
    )
    with torch.no_grad(), _record(down, before):
        with apply_sparsity(model, adapter, geometry, plan) as controller, _record(down, after):
            model(_ids())
        scores = plan.mlp_routers[layer].scores(router_in[0])
    hook.remove()
    keep = num_kept(0.25, geometry.ffn_dim)
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, torch.topk(scores, keep).indices, True)
    # OPT's MLP runs on (batch * seq, ffn): compare per token.
    x, y = before[0].reshape(selected.shape), after[0].reshape(selected.shape)
    assert torch.equal(y[selected], x[selected]) and (y[~selected] == 0).all()
    assert controller.stats.mlp_density() == pytest.approx(keep / geometry.ffn_dim)
    assert controller.stats.attn_density() is None  # attention untouched at attn_topk=1.0


def test_missing_routers_are_named() -> None:
    model, adapter, geometry = _setup("opt")
    with pytest.raises(ValueError, match=r"head router for layers \[1\]"):
        check_plan(SparsityPlan(Mode.sparse, attn_topk=0.5, head_routers={}), geometry)
    routers = _routers(geometry, geometry.num_kv_heads, _router_input_dim(model, adapter))
    with pytest.raises(ValueError, match=r"MLP router for layers \[0, 1\]"):
        check_plan(SparsityPlan(Mode.sparse, attn_topk=0.5, head_routers=routers, mlp_topk=0.5), geometry)
    # apply_sparsity checks before installing anything.
    with (
        pytest.raises(ValueError, match="head router"),
        apply_sparsity(model, adapter, geometry, SparsityPlan(Mode.sparse, attn_topk=0.5)),
    ):
        pass


def test_bad_plans_are_refused() -> None:
    _, _, geometry = _setup("llama-gqa")
    with pytest.raises(ValueError, match="needs a ReLU MLP"):
        check_plan(SparsityPlan(Mode.sparse, attn_topk=1.0, mlp_topk=0.5), geometry)
    with pytest.raises(ValueError, match=r"layers \[7\] outside"):
        check_plan(SparsityPlan(Mode.sparse_attn, dense_attn_layers=frozenset({0, 7})), geometry)
    wrong = {1: LinearRouter(64, geometry.num_heads, 0)}  # per query head, but GQA selects KV groups
    with pytest.raises(ValueError, match="scores 8 units; this model has 2"):
        check_plan(SparsityPlan(Mode.sparse, attn_topk=0.5, head_routers=wrong), geometry)


@pytest.mark.parametrize(
    ("fraction", "units", "kept"),
    [(0.5, 8, 4), (0.3, 10, 3), (0.1, 8, 1), (0.01, 2, 1), (1.0, 8, 8), (0.6, 2, 2)],
)
def test_num_kept(fraction: float, units: int, kept: int) -> None:
    assert num_kept(fraction, units) == kept
