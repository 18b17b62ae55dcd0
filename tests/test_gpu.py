"""The Triton kernels and the model on a real CUDA GPU (skipped where there is none).

Run on a GPU machine with the interpreter off::

    VMAMBA_GPU_TESTS=1 python -m pytest tests/test_gpu.py -q

Oracle: the sequential reference scan run in float64 on the same GPU (the blocked torch scan in
float64 where L is too long for the step-by-step loop), fresh random inputs per case, relative
error in the 2-norm; every output element must be finite (an unwritten one shows up as garbage).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import SCAN_INPUTS, make_scan_inputs

from vmamba_cli import kernels
from vmamba_cli.kernels import triton as scan_triton
from vmamba_cli.kernels.reference import cross_merge_reference, cross_scan_reference, selective_scan_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or scan_triton.INTERPRET or not scan_triton.is_available("cuda"),
    reason="needs a CUDA GPU, triton, and TRITON_INTERPRET unset (VMAMBA_GPU_TESTS=1)")

def _inputs(batch, groups, per_group, d_state, length, dtype, seed):
    return make_scan_inputs(batch, groups, per_group, d_state, length, dtype=dtype, seed=seed, device="cuda",
                            spikes=5)


def _scan_and_grads(fn, inputs, dout, upcast=False, **kwargs):
    leaves = {k: (v.double() if upcast else v).detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y = fn(*(leaves[k] for k in SCAN_INPUTS), delta_softplus=True, **kwargs)
    (y.double() * dout).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def _rel(actual, expected):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


CASES = [
    # batch, groups, per_group, N, L, chunk_size
    (2, 4, 24, 1, 777, None),        # single chunk, masked channel lanes, odd L
    (2, 4, 96, 1, 3136, 256),        # VMamba-T stage-0 width, forced carry passes
    (1, 4, 16, 16, 1000, None),      # v0 d_state
    (1, 4, 8, 8, 1, None),           # L = 1
    (1, 4, 96, 1, 65536, None),      # 1024x1024 stage 0: the heuristic's many chunks
]


@pytest.mark.parametrize("batch,groups,per_group,d_state,length,chunk", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_scan_matches_float64_reference(batch, groups, per_group, d_state, length, chunk, dtype):
    if length > 4096 and dtype == torch.bfloat16:
        pytest.skip("the float32 case covers the long sequence")
    x = _inputs(batch, groups, per_group, d_state, length, dtype, seed=length + d_state)
    dout = torch.randn(batch, groups * per_group, length, device="cuda", dtype=torch.float64)
    y, grads = _scan_and_grads(scan_triton.selective_scan, x, dout, chunk_size=chunk)
    if length > 4096:
        ref_fn = kernels.selective_scan
        y_ref, grads_ref = _scan_and_grads(lambda *a, **k: ref_fn(*a, backend="torch", **k), x, dout, upcast=True)
    else:
        y_ref, grads_ref = _scan_and_grads(selective_scan_reference, x, dout, upcast=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel(y, y_ref) < tol
    for name in SCAN_INPUTS:
        assert grads[name].dtype == x[name].dtype and grads[name].shape == x[name].shape
        err = _rel(grads[name], grads_ref[name])
        assert err < (tol if dtype == torch.float32 else 5e-2), f"d{name}: {err:.2e}"


@pytest.mark.parametrize("batch,groups,per_group,d_state,length,chunk", [c for c in CASES if c[3] == 1])
def test_triton_scan_training_and_inference_launches(batch, groups, per_group, d_state, length, chunk):
    """The N = 1 kernels: the training forward (tile by tile), the backward (one tile ahead, dB /
    dC as per-block partials) and the inference forward (one tile ahead), float32."""
    x = _inputs(batch, groups, per_group, d_state, length, torch.float32, seed=length + 7)
    dout = torch.randn(batch, groups * per_group, length, device="cuda", dtype=torch.float64)
    y, grads = _scan_and_grads(scan_triton.selective_scan, x, dout, chunk_size=chunk)
    with torch.no_grad():
        y_inference = scan_triton.selective_scan(*(x[k] for k in SCAN_INPUTS), delta_softplus=True,
                                                 chunk_size=chunk)
    if length > 4096:
        ref_fn = kernels.selective_scan
        y_ref, grads_ref = _scan_and_grads(lambda *a, **k: ref_fn(*a, backend="torch", **k), x, dout, upcast=True)
    else:
        y_ref, grads_ref = _scan_and_grads(selective_scan_reference, x, dout, upcast=True)
    assert _rel(y, y_ref) < 1e-5 and _rel(y_inference, y_ref) < 1e-5
    for name in SCAN_INPUTS:
        assert _rel(grads[name], grads_ref[name]) < 1e-5, name


@pytest.mark.parametrize("height,width", [(56, 56), (7, 9), (33, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cross_scan_and_merge(height, width, dtype):
    x = torch.randn(2, 48, height, width, device="cuda").to(dtype)
    assert torch.equal(scan_triton.cross_scan(x), cross_scan_reference(x))
    ys = torch.randn(2, 4, 48, height, width, device="cuda").to(dtype)
    merged = scan_triton.cross_merge(ys)
    assert merged.dtype == dtype
    # The kernel sums the four directions in float32 and rounds once: within one rounding of that.
    expected = cross_merge_reference(ys.float())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(merged.float(), expected, rtol=eps, atol=1e-5)


def test_triton_cross_scan_channels_last():
    x = torch.randn(4, 96, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
    assert torch.equal(scan_triton.cross_scan(x), cross_scan_reference(x))


def test_triton_cross_scan_many_planes():
    # batch x channels above 65,535 (grid axis limits) at VMamba-T stage 3, batch 128.
    x = torch.randn(128, 768, 7, 7, device="cuda")
    assert torch.equal(scan_triton.cross_scan(x), cross_scan_reference(x))
    ys = torch.randn(128, 4, 768, 7, 7, device="cuda")
    torch.testing.assert_close(scan_triton.cross_merge(ys), cross_merge_reference(ys), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("batch,d_inner,height,width", [
    (2, 96, 56, 56),      # VMamba-T stage 0 at 224, one chunk
    (1, 96, 256, 256),    # stage 0 at 1024: L = 65,536, the heuristic's many chunks
    (3, 40, 13, 21),      # H != W, masked channel lanes
])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_core_matches_composed_ops(batch, d_inner, height, width, channels_last):
    """The d_state = 1 SS2D core reading x along each route (float32) against the composed
    torch-backend ops (cross-scan copies, float64 projections, the blocked scan with its float32
    state). A wrong route index gives errors of order 1."""
    from vmamba_cli.kernels import compose_cross_selective_scan

    gen = torch.Generator(device="cuda").manual_seed(batch * height + width)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device="cuda") * scale

    rank = max(1, d_inner // 16)
    params = {"x_proj_weight": randn(4, rank + 2, d_inner, scale=d_inner ** -0.5),
              "dt_projs_weight": randn(4, d_inner, rank, scale=rank ** -0.5),
              "dt_projs_bias": randn(4, d_inner, scale=0.5) - 3.0,
              "A_logs": randn(4 * d_inner, 1, scale=0.3), "Ds": randn(4 * d_inner)}
    x = randn(batch, d_inner, height, width)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dout = randn(batch, d_inner, height, width)
    results = {}
    for name, core, dtype in (("fused", scan_triton.cross_selective_scan, torch.float32),
                              ("composed", lambda *a: compose_cross_selective_scan(*a, backend="torch"),
                               torch.float64)):
        leaves = {k: v.to(dtype).detach().clone().requires_grad_(True) for k, v in {"x": x, **params}.items()}
        out = core(*leaves.values())
        (out.double() * dout).sum().backward()
        results[name] = (out.detach(), {k: v.grad for k, v in leaves.items()})
    assert _rel(results["fused"][0], results["composed"][0]) < 1e-4
    for k, grad in results["composed"][1].items():
        assert _rel(results["fused"][1][k], grad) < 1e-3, k
    # Inference: delta formed inside the scan kernel (one chunk) or by the batched matmul.
    for dt_proj in (True, False):
        tuning = dataclasses.replace(scan_triton.DEFAULT_TUNING, fused_dt_proj=dt_proj)
        with torch.no_grad():
            assert _rel(scan_triton.cross_selective_scan(x, *params.values(), tuning=tuning),
                        results["composed"][0]) < 1e-4


def test_model_triton_matches_torch_backend_forward_and_backward():
    from vmamba_cli.model import create_model

    torch.manual_seed(0)
    model = create_model("vmamba-tiny").cuda().eval()
    images = torch.randn(4, 3, 224, 224, device="cuda")
    outputs = {}
    for backend in ("torch", "triton"):
        model.set_scan_backend(backend)
        model.zero_grad()
        logits = model(images)
        logits.square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        outputs[backend] = (logits.detach(), grads)
    # TF32 may be on for convolutions; compare relative norms.
    assert _rel(outputs["triton"][0], outputs["torch"][0]) < 1e-3
    assert _rel(outputs["triton"][1], outputs["torch"][1]) < 1e-2
    # Inference (no backward) runs the fused SS2D core.
    with torch.no_grad():
        assert _rel(model(images), outputs["torch"][0]) < 1e-3


def test_auto_backend_is_triton_on_cuda():
    assert kernels.resolve_backend("auto", "cuda") == "triton"


def test_channel_layer_norm_kernel_in_model_layout():
    from vmamba_cli.model import LayerNorm2d

    norm = LayerNorm2d(96).cuda()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(8, 96, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dout = torch.randn(8, 96, 56, 56, device="cuda")
    results = {}
    for backend in ("triton", "torch"):
        norm.backend = backend
        x.grad = norm.weight.grad = norm.bias.grad = None
        y = norm(x)
        (y * dout).sum().backward()
        results[backend] = [y.detach(), x.grad.clone(), norm.weight.grad.clone(), norm.bias.grad.clone()]
    for got, want in zip(results["triton"], results["torch"]):
        assert _rel(got, want) < 1e-5
    # Under autocast the kernel computes in float32 and returns float32, like F.layer_norm; a norm
    # marked autocast_output hands its reader the float16 that reader would cast to.
    with torch.autocast("cuda", dtype=torch.float16):
        norm.backend = "triton"
        assert norm(x.half()).dtype == torch.float32
        reference = norm(x).half()
        norm.autocast_output = True
        marked = norm(x)
    # The same values up to the last bit (the float16-output kernel is compiled on its own).
    assert marked.dtype == torch.float16 and _rel(marked, reference) < 1e-3
    x.grad = None
    (marked.float() * dout).sum().backward()
    assert _rel(x.grad, results["torch"][1]) < 1e-2
