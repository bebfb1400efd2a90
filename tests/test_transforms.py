"""IAF / MAF layers: invertibility, exact log-determinants, triangularity, Pyro plumbing."""

from __future__ import annotations

import copy
import io
import itertools
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from pyro.optim import Adam

import pyro_arflow as af
from conftest import CONDITIONERS, CONTEXT_DIM, LAYER_KINDS, make_layer, perturb
from pyro_arflow import validation
from pyro_arflow.validation import flush_finite_checks

DIMS = [1, 2, 5, 17]
BATCH_SHAPES = [(), (3,), (2, 4)]
COMBINATIONS = list(itertools.product(LAYER_KINDS, CONDITIONERS, [False, True]))


def combo_id(combo) -> str:
    kind, conditioner, conditional = combo
    return f"{kind}-{conditioner}-{'conditional' if conditional else 'plain'}"


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("input_dim", DIMS)
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_inverse_of_forward_is_identity(combo, input_dim, batch_shape, dtype, tol):
    kind, conditioner, conditional = combo
    _, transform, _ = make_layer(kind, conditioner, input_dim, conditional, dtype, batch_shape)
    x = torch.randn(batch_shape + (input_dim,), dtype=dtype)
    y = transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert not torch.allclose(y, x, atol=1e-3)  # the layer is not the identity
    x_back = transform.inv(y.clone())  # a clone defeats the x <-> y cache
    torch.testing.assert_close(x_back, x, atol=tol, rtol=0)
    y_back = transform(x_back.clone())
    torch.testing.assert_close(y_back, y, atol=tol, rtol=0)


def per_sample_jacobians(transform, x):
    """(B, D, D) Jacobians of y = transform(x) for each of the B = prod(batch) samples."""
    flat = x.reshape(-1, x.shape[-1])
    full = torch.autograd.functional.jacobian(
        lambda v: transform(v.reshape(x.shape)).reshape(flat.shape), flat
    )
    batch = flat.shape[0]
    blocks = torch.stack([full[b, :, b, :] for b in range(batch)])
    off_diagonal = full.clone()
    for b in range(batch):
        off_diagonal[b, :, b, :] = 0
    assert off_diagonal.abs().max() == 0  # samples never mix
    return blocks


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("input_dim", DIMS)
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_log_abs_det_matches_autograd_jacobian(combo, input_dim, batch_shape):
    kind, conditioner, conditional = combo
    dtype = torch.float64
    module, transform, _ = make_layer(kind, conditioner, input_dim, conditional, dtype, batch_shape)
    x = torch.randn(batch_shape + (input_dim,), dtype=dtype)
    y = transform(x)
    jacobians = per_sample_jacobians(transform, x)
    expected = torch.linalg.slogdet(jacobians).logabsdet.reshape(y.shape[:-1])
    torch.testing.assert_close(transform.log_abs_det_jacobian(x, y), expected, atol=1e-8, rtol=0)
    # a fresh pair (no cached log-scales) gives the same number
    fresh = transform.log_abs_det_jacobian(x.clone(), y.clone())
    torch.testing.assert_close(fresh, expected, atol=1e-8, rtol=0)
    # the inverse reports the negated log-determinant
    torch.testing.assert_close(
        transform.inv.log_abs_det_jacobian(y.clone(), x.clone()), -expected, atol=1e-8, rtol=0
    )
    # triangular in the layer's order: output i never depends on an input after it
    rank = module.conditioner.inverse_ordering
    later = rank[None, :] > rank[:, None]
    assert torch.all(jacobians[:, later] == 0)


@pytest.mark.parametrize("ordering", ["reversed", "random", [2, 0, 4, 1, 3]], ids=str)
@pytest.mark.parametrize("conditioner", CONDITIONERS)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_triangular_in_any_ordering(kind, conditioner, ordering):
    module, transform, _ = make_layer(
        kind, conditioner, 5, dtype=torch.float64, ordering=ordering, seed=3
    )
    x = torch.randn(32, 5, dtype=torch.float64)  # enough points that no ReLU path is dead on all
    jacobians = per_sample_jacobians(transform, x)
    rank = module.conditioner.inverse_ordering
    later = rank[None, :] > rank[:, None]
    assert torch.all(jacobians[:, later] == 0)
    assert torch.all(jacobians[:, ~later].abs().sum(0) > 0)  # and does depend on the earlier ones
    torch.testing.assert_close(transform.inv(transform(x).clone()), x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_density_integrates_to_one_in_2d(combo):
    kind, conditioner, conditional = combo
    _, transform, _ = make_layer(kind, conditioner, 2, conditional, torch.float64, seed=5)
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    flow = dist.TransformedDistribution(base, [transform])
    half_width = 1.5 * flow.sample((2000,)).abs().max().item()  # the grid covers the mass
    step = 0.04
    axis = torch.arange(-half_width, half_width, step, dtype=torch.float64) + step / 2
    grid = torch.cartesian_prod(axis, axis)
    mass = flow.log_prob(grid).exp().sum() * step**2
    assert abs(mass.item() - 1.0) < 1e-3


def test_layers_start_as_identity():
    for kind, conditioner in itertools.product(LAYER_KINDS, CONDITIONERS):
        layer = (af.iaf if kind == "iaf" else af.maf)(6, conditioner=conditioner)
        x = torch.randn(3, 6)
        torch.testing.assert_close(layer(x), x, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(
            layer.log_abs_det_jacobian(x, layer(x)), torch.zeros(3), atol=1e-6, rtol=0
        )


def test_pyro_attributes_and_cache():
    layer = af.iaf(4)
    assert layer.bijective and layer.autoregressive and layer.sign == 1
    assert layer.domain.event_dim == 1 and layer.codomain.event_dim == 1
    x = torch.randn(4)
    y = layer(x)
    assert layer.inv(y) is x  # cache_size=1: the pair is remembered
    uncached = layer.with_cache(0)
    assert uncached.conditioner is layer.conditioner
    assert uncached.inv(y) is not x
    maf_layer = af.maf(3)
    assert list(maf_layer.parameters()) == list(maf_layer.conditioner.parameters())
    pyro.module("layer", maf_layer)  # its parameters are seen, unlike an IAF's .inv
    assert set(pyro.get_param_store().keys()) == {
        f"layer$$${name}" for name, _ in maf_layer.named_parameters()
    }


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_log_abs_det_reuses_the_pair_just_computed(kind):
    layer = perturb((af.iaf if kind == "iaf" else af.maf)(5))
    calls = []
    layer.conditioner.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(7, 5)
    y = layer(x)
    before = len(calls)
    layer.log_abs_det_jacobian(x, y)
    assert len(calls) == before  # no network call for the pair it just produced
    layer.log_abs_det_jacobian(x.clone(), y.clone())
    assert len(calls) == before + 1  # exactly one pass for any other pair


def test_conditional_context_broadcasts_against_batch():
    module = perturb(af.conditional_iaf(4, CONTEXT_DIM, hidden_dims=[12]))
    context = torch.randn(CONTEXT_DIM)
    x = torch.randn(6, 4)
    batched = module.condition(context.expand(6, CONTEXT_DIM))(x)
    torch.testing.assert_close(module.condition(context)(x), batched)
    # one x, several contexts: the output takes the context's batch shape
    assert module.condition(torch.randn(5, CONTEXT_DIM))(torch.randn(4)).shape == (5, 4)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_one_layer_class_whose_context_is_optional(kind):
    """A layer built with a context is the same class; conditioning returns that class bound
    to the context, sharing the parameters, and the bound layer computes what the network
    says for that context. A layer without context conditions to itself."""
    helper = af.conditional_iaf if kind == "iaf" else af.conditional_maf
    layer_class = af.IAF if kind == "iaf" else af.MAF
    layer = perturb(helper(4, CONTEXT_DIM, hidden_dims=[12]))
    context, x = torch.randn(CONTEXT_DIM), torch.randn(6, 4)
    bound = layer.condition(context)
    assert type(layer) is type(bound) is layer_class
    assert isinstance(layer, ConditionalTransformModule)
    assert bound.conditioner is layer.conditioner
    base = x if kind == "iaf" else bound.inv(x)  # y = x for a MAF: its network reads y
    loc, raw = layer.conditioner(base if kind == "iaf" else x, context)
    expected = loc + layer.scale_map(raw)[0] * base
    torch.testing.assert_close(bound(x) if kind == "iaf" else x, expected)
    plain = af.iaf(4) if kind == "iaf" else af.maf(4)
    assert plain.condition(context) is plain
    with pytest.raises(ValueError, match="reads a context of size 3: use layer.condition"):
        layer(x)
    with pytest.raises(ValueError, match="got a context, but its conditioner takes none"):
        layer_class(plain.conditioner, context=context)


@pytest.mark.parametrize(
    "old, new",
    [
        ("ConditionalIAF", "IAF"),
        ("ConditionalMAF", "MAF"),
        ("ConditionalAffineAutoregressive", "AffineAutoregressive"),
        ("ConditionedAffineAutoregressive", "AffineAutoregressive"),
    ],
)
def test_names_of_version_0_3_still_work_and_warn(old, new):
    with pytest.warns(FutureWarning, match=f"{old} is deprecated.*use {new}"):
        alias = getattr(af, old) if hasattr(af, new) else getattr(af.transforms, old)
    assert alias is getattr(af.transforms, new)
    conditioner = af.MaskedConditioner(3, hidden_dims=[4], context_dim=2)
    if old.startswith("Conditional") and old != "ConditionalAffineAutoregressive":
        with pytest.warns(FutureWarning):
            layer = getattr(af, old)(conditioner)
        assert isinstance(layer.condition(torch.randn(2)), alias)
    with pytest.warns(FutureWarning, match="permutation=.*use orderings="):
        flow = af.build_flow("maf", 3, num_flows=2, permutation="reversed")
    assert flow.parts[1].conditioner.ordering.tolist() == [2, 1, 0]


@pytest.mark.parametrize("elbo_class", [Trace_ELBO, JitTrace_ELBO])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_gradients_reach_every_parameter_through_svi(combo, elbo_class):
    kind, conditioner, conditional = combo
    module, _, _ = make_layer(kind, conditioner, 3, conditional, seed=2)
    context = torch.randn(CONTEXT_DIM)
    data = torch.tensor([0.5, -1.0, 2.0])

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("obs", dist.Normal(z, 0.5).to_event(1), obs=data)

    def guide():
        pyro.module("flow", module)
        transform = module.condition(context) if conditional else module
        base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
        pyro.sample("z", dist.TransformedDistribution(base, [transform]))

    elbo = elbo_class(ignore_jit_warnings=True) if elbo_class is JitTrace_ELBO else elbo_class()
    for _ in range(2):  # the second call runs the compiled trace under JIT
        module.zero_grad()
        loss = elbo.loss_and_grads(model, guide)
    assert torch.isfinite(torch.as_tensor(loss))
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    svi = SVI(model, guide, Adam({"lr": 1e-3}), elbo)
    svi.step()
    assert {f"flow$$${name}" for name, _ in module.named_parameters()} <= set(
        pyro.get_param_store().keys()
    )


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_float64_and_round_trips_reproduce_outputs_bit_for_bit(combo, tmp_path):
    kind, conditioner, conditional = combo
    module, transform, context = make_layer(kind, conditioner, 5, conditional, torch.float64, (3,))
    x = torch.randn(3, 5, dtype=torch.float64)
    y = transform(x)
    y.sum().backward()
    assert y.dtype == torch.float64
    x_back = transform.inv(y.detach().clone())

    def outputs(other):
        t = other.condition(context) if conditional else other
        return t(x), t.inv(y.detach().clone())

    rebuilt, _, _ = make_layer(kind, conditioner, 5, conditional, torch.float64, (3,), seed=99)
    rebuilt.load_state_dict(module.state_dict())
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    candidates = {
        "state_dict": rebuilt,
        "deepcopy": copy.deepcopy(module),
        "pickle": pickle.loads(pickle.dumps(module)),
        "torch.save": torch.load(buffer, weights_only=False),
    }
    for how, other in candidates.items():
        y2, x2 = outputs(other)
        assert torch.equal(y2, y), how
        assert torch.equal(x2, x_back), how


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_bad_input_raises_value_error(kind):
    layer = (af.iaf if kind == "iaf" else af.maf)(4)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\).*\(2, 3\)"):
        layer(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        layer.inv(torch.randn(5))
    with pytest.raises(ValueError, match="non-finite"):
        layer(torch.tensor([0.0, float("nan"), 1.0, 2.0]))
        flush_finite_checks()  # on a GPU the check is deferred; on the CPU it has fired
    with pytest.raises(ValueError, match="non-finite"):
        layer.inv(torch.tensor([0.0, float("inf"), 1.0, 2.0]))
        flush_finite_checks()
    conditional = (af.conditional_iaf if kind == "iaf" else af.conditional_maf)(4, 2)
    with pytest.raises(ValueError, match=r"context.*\(\.\.\., 2\).*\(3,\)"):
        conditional.condition(torch.randn(3))(torch.randn(4))
    with pytest.raises(ValueError, match="context"):
        conditional.conditioner(torch.randn(4))
    with pytest.raises(ValueError, match="unknown conditioner 'gru'.*lstm.*masked"):
        (af.iaf if kind == "iaf" else af.maf)(4, conditioner="gru")
    with pytest.raises(ValueError, match="unknown conditioner"):
        af.conditional_iaf(4, 2, conditioner="made")


@pytest.mark.parametrize("conditioner", CONDITIONERS)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_the_layer_that_overflows_says_so(kind, conditioner):
    """float32 overflow in a layer is reported by that layer (under Pyro's validation)."""
    module, _, _ = make_layer(kind, conditioner, 6, seed=4)
    perturb(module, std=1.0)
    huge = 3e38 * torch.randn(3, 6).sign()  # near float32 max: any scale off 1 overflows
    sequential = module if kind == "maf" else module.inv  # the solve direction of each
    name = "MAF" if kind == "maf" else "IAF"
    with pytest.raises(
        ValueError,
        match=rf"the {name} layer.*non-finite values in its sequential direction.*overflow",
    ):
        sequential(huge)
        flush_finite_checks()
    with pyro.validation_enabled(False):
        assert not torch.isfinite(sequential(huge.clone())).all()  # the check follows the switch


def test_diverged_parameters_are_named_with_a_remedy():
    layer = af.iaf(4, hidden_dims=[8])
    with torch.no_grad():
        layer.conditioner.output.affine[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite parameters \(output.affine\).*diverged"):
        layer(torch.randn(2, 4))
        flush_finite_checks()


def test_deferred_check_bookkeeping_on_a_stand_in_device():
    """The CUDA path's banks and messages, with a stand-in event (tests/test_cuda.py runs
    the real one): a failure among many checks is named, once, whenever it lands."""

    class Landed:
        def record(self):
            pass

        def query(self):
            return True

        def synchronize(self):
            pass

    checks = validation._DeferredChecks(torch.device("cpu"), event=Landed, pin=False)
    value = torch.randn(4, 3, requires_grad=True)  # as a layer's output would be
    raised = []
    for call in range(100):
        bad = value * 1.0
        if call == 37:
            bad = bad + float("nan")
        try:
            checks.add(bad, lambda call=call: f"call {call}")
        except ValueError as error:
            raised.append(str(error))
    try:
        checks.flush()
    except ValueError as error:
        raised.append(str(error))
    assert raised == ["call 37 (found on the GPU by a deferred check)"]
    checks.flush()  # nothing left over
