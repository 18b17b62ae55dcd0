"""Selective scan and cross-scan/merge backends against the official golden tensors and each other."""

import pytest
import torch
from conftest import SCAN_INPUTS as INPUTS
from conftest import make_scan_inputs, ss2d_params
from safetensors.torch import load_file

from vmamba_cli import kernels
from vmamba_cli.kernels import torch_scan
from vmamba_cli.kernels.torch_scan import linear_recurrence

CASES = ("", "n1.", "n16.")


@pytest.fixture(scope="module")
def scan_ref(fixtures_dir):
    return load_file(str(fixtures_dir / "selective_scan_ref.safetensors"))


def _run(ref, prefix, backend):
    ins = {k: ref[prefix + k].clone().requires_grad_(True) for k in INPUTS}
    y = kernels.selective_scan(*(ins[k] for k in INPUTS), delta_softplus=True, backend=backend)
    (y * ref[prefix + "dout"]).sum().backward()
    return y, {k: ins[k].grad for k in INPUTS}


def _assert_rel(actual, expected, name):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= 1e-5 * scale, f"{name}: max|diff| {err:.3g} > 1e-5 * {scale:.3g}"


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("prefix", CASES)
def test_scan_matches_official_fixture(scan_ref, prefix, backend):
    y, grads = _run(scan_ref, prefix, backend)
    assert y.dtype == torch.float32
    _assert_rel(y, scan_ref[prefix + "y"], "y")
    for k in INPUTS:
        _assert_rel(grads[k], scan_ref[prefix + "d" + k], "d" + k)


def _random_case(batch=2, groups=4, per_group=3, d_state=2, length=37, seed=0):
    return make_scan_inputs(batch, groups, per_group, d_state, length, seed=seed, spikes=0)


@pytest.mark.parametrize("length", [1, 2, 5, 37, 300])
@pytest.mark.parametrize("d_state", [1, 4])
def test_blocked_matches_reference_forward_and_backward(length, d_state):
    case = _random_case(length=length, d_state=d_state, seed=length)
    out = {}
    for backend in ("reference", "torch"):
        ins = {k: v.clone().requires_grad_(True) for k, v in case.items()}
        y = kernels.selective_scan(*(ins[k] for k in INPUTS), delta_softplus=True, backend=backend)
        (y * torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y)).sum().backward()
        out[backend] = (y.detach(), {k: ins[k].grad for k in INPUTS})
    (y_ref, g_ref), (y_blk, g_blk) = out["reference"], out["torch"]
    torch.testing.assert_close(y_blk, y_ref, atol=1e-5, rtol=1e-5)
    for k in INPUTS:
        torch.testing.assert_close(g_blk[k], g_ref[k], atol=2e-5, rtol=1e-4, msg=k)


def test_optional_inputs_and_no_softplus():
    case = _random_case(length=20)
    for backend in ("reference", "torch"):
        y = kernels.selective_scan(case["u"], case["delta"].abs(), case["A"], case["B"], case["C"], backend=backend)
        # Hand-rolled recurrence for one channel: no D, no bias, no softplus.
        b, c = 1, 7
        k = c // 3
        h = torch.zeros(case["A"].shape[1])
        expect = []
        for t in range(20):
            dt = case["delta"][b, c, t].abs()
            h = torch.exp(dt * case["A"][c]) * h + dt * case["B"][b, k, :, t] * case["u"][b, c, t]
            expect.append((h * case["C"][b, k, :, t]).sum())
        torch.testing.assert_close(y[b, c], torch.stack(expect), atol=1e-5, rtol=1e-5)


def test_low_precision_inputs_give_float32_output():
    case = _random_case(length=50)
    half = {k: (v.bfloat16() if k in ("u", "delta", "B", "C") else v) for k, v in case.items()}
    y16 = kernels.selective_scan(*(half[k] for k in INPUTS), delta_softplus=True, backend="torch")
    y32 = kernels.selective_scan(*(case[k] for k in INPUTS), delta_softplus=True, backend="torch")
    assert y16.dtype == torch.float32
    torch.testing.assert_close(y16, y32, atol=0.1, rtol=0.05)
    y_in = kernels.selective_scan(*(half[k] for k in INPUTS), delta_softplus=True, backend="torch",
                                  output_dtype=torch.bfloat16)
    assert y_in.dtype == torch.bfloat16


def test_shape_errors_are_clear():
    case = _random_case()
    with pytest.raises(ValueError, match="B must be"):
        kernels.selective_scan(case["u"], case["delta"], case["A"], case["B"][:, :, :, :5], case["C"])
    with pytest.raises(ValueError, match="unknown scan backend"):
        kernels.selective_scan(*(case[k] for k in INPUTS), backend="nope")


def test_linear_recurrence_is_stable_with_tiny_decays():
    a = torch.full((3, 1000), 1e-30)
    a[:, ::7] = 0.999
    b = torch.randn(3, 1000)
    h = linear_recurrence(a, b)
    expect = torch.empty_like(b)
    state = torch.zeros(3)
    for t in range(1000):
        state = a[:, t] * state + b[:, t]
        expect[:, t] = state
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, expect)
    back = linear_recurrence(a, b, reverse=True)
    torch.testing.assert_close(back, linear_recurrence(a.flip(-1), b.flip(-1)).flip(-1))


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (4, 7), (7, 4), (6, 5)])
def test_cross_scan_routes(size):
    h, w = size
    x = torch.randn(2, 3, h, w)
    ref = kernels.cross_scan(x, backend="reference")
    # Direct from the definition of the four orders (docs/design.md §3.7).
    assert torch.equal(ref[:, 0], x.reshape(2, 3, -1))
    assert torch.equal(ref[:, 1], x.transpose(2, 3).reshape(2, 3, -1))
    assert torch.equal(ref[:, 2], x.reshape(2, 3, -1).flip(-1))
    assert torch.equal(ref[:, 3], x.transpose(2, 3).reshape(2, 3, -1).flip(-1))
    assert torch.equal(kernels.cross_scan(x, backend="torch"), ref)
    ys = torch.randn(2, 4, 3, h, w)
    torch.testing.assert_close(kernels.cross_merge(ys, backend="torch"), kernels.cross_merge(ys, backend="reference"))


def test_cross_merge_is_adjoint_of_cross_scan():
    """<scan(x), ys> == <x, merge(ys)>: merge is the transpose of scan, as the gradient requires."""
    x = torch.randn(2, 5, 6, 9, dtype=torch.float64)
    ys = torch.randn(2, 4, 5, 6, 9, dtype=torch.float64)
    for backend in ("reference", "torch"):
        lhs = (kernels.cross_scan(x, backend) * ys.reshape(2, 4, 5, -1)).sum()
        rhs = (x * kernels.cross_merge(ys, backend)).sum()
        torch.testing.assert_close(lhs, rhs)
        xg = x.clone().requires_grad_(True)
        (kernels.cross_scan(xg, backend) * ys.reshape(2, 4, 5, -1)).sum().backward()
        torch.testing.assert_close(xg.grad, kernels.cross_merge(ys, backend))


def test_backend_resolution():
    assert kernels.resolve_backend("torch", "cpu") == "torch"
    assert kernels.resolve_backend("auto", "cpu") in kernels.available_backends("cpu")
    assert {"reference", "torch"} <= set(kernels.available_backends("cpu"))


def test_blocked_channel_blocks_that_cut_through_groups():
    """Large inputs are processed in channel blocks; B/C grads must still sum over whole groups."""
    case = _random_case(batch=2, groups=4, per_group=3, d_state=3, length=40, seed=7)
    small = 2 * 3 * 40 * 5  # blocks of 5 channels
    assert torch_scan._channel_blocks(2, 12, 3, 40, small) == [(0, 5), (5, 10), (10, 12)]
    scans = {"reference": kernels.selective_scan,
             "torch": lambda *a, **k: torch_scan.selective_scan_blocked(*a, **k, max_block_elements=small)}
    grads = {}
    for backend, scan in scans.items():
        ins = {k: v.clone().requires_grad_(True) for k, v in case.items()}
        y = scan(*(ins[k] for k in INPUTS), delta_softplus=True,
                 **({"backend": backend} if backend == "reference" else {}))
        (y * y).sum().backward()
        grads[backend] = {k: ins[k].grad for k in INPUTS}
    for k in INPUTS:
        _assert_rel(grads["torch"][k], grads["reference"][k], "d" + k)


# ------------------------------------------------------------------------------------------------
# Every backend: a retained graph walked twice, and empty inputs
# ------------------------------------------------------------------------------------------------

def _backends():
    """Every backend usable for CPU tensors here (triton under the interpreter, cpu when built)."""
    return [pytest.param(name, marks=pytest.mark.skipif(name not in kernels.available_backends("cpu"),
                                                        reason=f"backend {name} not available here"))
            for name in kernels.BACKENDS]


def _leaves(tensors):
    return {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}


def _twice_accumulates(out, leaves, upstream):
    """Backward through a retained graph, then again: each gradient exactly doubles."""
    out.backward(upstream, retain_graph=True)
    first = {k: v.grad.clone() for k, v in leaves.items()}
    out.backward(upstream)
    for name, leaf in leaves.items():
        assert torch.equal(leaf.grad, 2 * first[name]), name
    return first


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("d_state", [1, 4])
def test_second_backward_accumulates_twice(backend, d_state):
    leaves = _leaves(make_scan_inputs(2, 2, 4, d_state, 11, seed=d_state))
    y = kernels.selective_scan(*(leaves[k] for k in INPUTS), delta_softplus=True, backend=backend)
    first = _twice_accumulates(y, leaves, torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    assert all(g.abs().sum() > 0 for g in first.values())


@pytest.mark.parametrize("backend", _backends())
def test_second_backward_through_the_ss2d_core(backend):
    gen = torch.Generator().manual_seed(3)
    leaves = _leaves({"x": torch.randn(1, 8, 3, 4, generator=gen), **ss2d_params(8, 1, 2, seed=4)})
    out = kernels.cross_selective_scan(*leaves.values(), backend=backend)
    first = _twice_accumulates(out, leaves, torch.randn(out.shape, generator=gen))
    assert all(g.abs().sum() > 0 for g in first.values())


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("batch,length,d_state", [(2, 0, 1), (2, 0, 4), (0, 9, 1), (0, 9, 4), (0, 0, 2)])
def test_empty_scan_gives_empty_output_and_gradients(backend, batch, length, d_state):
    inputs = make_scan_inputs(batch, 2, 3, d_state, length)
    leaves = _leaves(inputs)
    y = kernels.selective_scan(*(leaves[k] for k in INPUTS), delta_softplus=True, backend=backend)
    assert y.shape == (batch, 6, length) and y.dtype == torch.float32
    y.backward(torch.ones_like(y))
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.shape == inputs[name].shape, name
        assert not leaf.grad.any(), name


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("batch,height,width", [(2, 0, 5), (2, 4, 0), (0, 3, 4)])
def test_empty_maps_give_empty_cross_ops_and_core(backend, batch, height, width):
    x = torch.randn(batch, 8, height, width, requires_grad=True)
    seq = kernels.cross_scan(x, backend=backend)
    assert seq.shape == (batch, 4, 8, height * width)
    ys = torch.randn(batch, 4, 8, height, width, requires_grad=True)
    merged = kernels.cross_merge(ys, backend=backend)
    assert merged.shape == (batch, 8, height, width)
    (seq.sum() + merged.sum()).backward()
    assert x.grad.shape == x.shape and ys.grad.shape == ys.shape

    params = ss2d_params(8, 1, 2)
    leaves = _leaves({"x": x.detach(), **params})
    out = kernels.cross_selective_scan(*leaves.values(), backend=backend)
    assert out.shape == (batch, 8, height, width)
    out.backward(torch.ones_like(out))
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and not leaf.grad.any(), name
