"""Selective scan and cross-scan/merge backends against the official golden tensors and each other."""

import pytest
import torch
from safetensors.torch import load_file

from vmamba_cli import kernels
from vmamba_cli.kernels.scan_torch import linear_recurrence

INPUTS = ("u", "delta", "A", "B", "C", "D", "delta_bias")
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
    g = torch.Generator().manual_seed(seed)
    ch = groups * per_group
    return dict(
        u=torch.randn(batch, ch, length, generator=g),
        delta=torch.randn(batch, ch, length, generator=g) * 0.5,
        A=-torch.rand(ch, d_state, generator=g) * 2 - 0.1,
        B=torch.randn(batch, groups, d_state, length, generator=g),
        C=torch.randn(batch, groups, d_state, length, generator=g),
        D=torch.randn(ch, generator=g),
        delta_bias=torch.randn(ch, generator=g) * 0.3,
    )


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
    # Direct from the definition of the four orders (spec §3.7).
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


def test_blocked_channel_blocks_that_cut_through_groups(monkeypatch):
    """Large inputs are processed in channel blocks; B/C grads must still sum over whole groups."""
    from vmamba_cli.kernels import scan_torch

    case = _random_case(batch=2, groups=4, per_group=3, d_state=3, length=40, seed=7)
    monkeypatch.setattr(scan_torch, "_MAX_BLOCK_ELEMENTS", 2 * 3 * 40 * 5)  # blocks of 5 channels
    assert scan_torch._channel_blocks(2, 12, 3, 40) == [(0, 5), (5, 10), (10, 12)]
    grads = {}
    for backend in ("reference", "torch"):
        ins = {k: v.clone().requires_grad_(True) for k, v in case.items()}
        y = kernels.selective_scan(*(ins[k] for k in INPUTS), delta_softplus=True, backend=backend)
        (y * y).sum().backward()
        grads[backend] = {k: ins[k].grad for k in INPUTS}
    for k in INPUTS:
        _assert_rel(grads["torch"][k], grads["reference"][k], "d" + k)
