"""Triton scan / cross-scan kernels, run by the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1).

The interpreter costs about a millisecond per Triton op per (program x step), so shapes are tiny:
few (batch, group) programs, L of a few dozen, small chunk sizes to force the cross-chunk carry.
Ahead-of-time compilation for sm_80 / sm_90 runs in a subprocess with the interpreter off.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import SCAN_INPUTS, make_scan_inputs, relative_error, run_scan, ss2d_params
from safetensors.torch import load_file

pytest.importorskip("triton")

from vmamba_cli import kernels  # noqa: E402
from vmamba_cli.kernels import triton as scan_triton  # noqa: E402
from vmamba_cli.kernels.reference import (cross_merge_reference, cross_scan_reference,  # noqa: E402
                                          selective_scan_reference)
from vmamba_cli.kernels.triton import DEFAULT_TUNING, ss2d  # noqa: E402

pytestmark = pytest.mark.skipif(not scan_triton.INTERPRET,
                                reason="needs TRITON_INTERPRET=1 before triton is imported")

_relative_error = relative_error
_make_scan_inputs = make_scan_inputs
_run_scan = run_scan


def _assert_close_to_reference(inputs, tol, grad_tol=None, softplus=True, **kwargs):
    batch, channels, length = inputs["u"].shape
    dout = torch.randn(batch, channels, length, generator=torch.Generator().manual_seed(7))
    y, grads = _run_scan(scan_triton.selective_scan, inputs, dout, delta_softplus=softplus, **kwargs)
    y_ref, grads_ref = _run_scan(selective_scan_reference, inputs, dout, delta_softplus=softplus)
    assert _relative_error(y, y_ref) <= tol
    for name in SCAN_INPUTS:
        if inputs[name] is None:
            assert grads[name] is None
            continue
        assert grads[name].dtype == inputs[name].dtype, name
        assert grads[name].shape == inputs[name].shape, name
        err = _relative_error(grads[name], grads_ref[name])
        assert err <= (grad_tol or tol), f"d{name}: relative error {err:.2e}"


# ----------------------------------------------------------------------------------------------
# Selective scan
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "n1.", "n16."])
def test_scan_matches_official_fixture(fixtures_dir, prefix):
    ref = load_file(str(fixtures_dir / "selective_scan_ref.safetensors"))
    inputs = {k: ref[prefix + k] for k in SCAN_INPUTS}
    y, grads = _run_scan(scan_triton.selective_scan, inputs, ref[prefix + "dout"], delta_softplus=True)
    assert y.dtype == torch.float32
    assert _relative_error(y, ref[prefix + "y"]) <= 1e-5
    for name in SCAN_INPUTS:
        err = _relative_error(grads[name], ref[prefix + "d" + name])
        assert err <= 1e-5, f"{prefix}d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("d_state,block_d", [(1, None), (1, 4), (8, None), (16, None)])
def test_scan_multi_chunk_matches_reference(d_state, block_d):
    # L = 37 is a multiple of no block size; 6 channels per group leave masked lanes in BLOCK_D = 8;
    # chunk_size = 16 with 8-step tiles gives three chunks of two tiles, so both carry passes
    # (forward h, backward dh) and the tile-to-tile hand-over inside a chunk run. N = 1: the
    # training forward loads tile by tile, the inference forward one tile ahead, and the backward
    # (always one tile ahead, never past its chunk's ends) writes dB / dC partials of one or (with
    # block_d = 4) two channel blocks.
    launch = dict(chunk_size=16, block_t=8, block_d=block_d)
    cfg = scan_triton.choose_scan_config(1, 2, 6, d_state, 37, training=True, **launch)
    assert cfg[2:5] == (8, 16, 3)
    assert cfg.prefetch is False
    assert scan_triton.choose_scan_config(1, 2, 6, d_state, 37, **launch).prefetch is (d_state == 1)
    inputs = _make_scan_inputs(batch=1, groups=2, per_group=6, d_state=d_state, length=37, seed=d_state)
    _assert_close_to_reference(inputs, tol=1e-5, **launch)
    # No backward to follow: the inference launch (its own tiles, loads one tile ahead).
    args = [inputs[k] for k in SCAN_INPUTS]
    with torch.no_grad():
        y = scan_triton.selective_scan(*args, delta_softplus=True, **launch)
    assert _relative_error(y, selective_scan_reference(*args, delta_softplus=True)) <= 1e-5


def test_scan_chunked_equals_single_chunk():
    inputs = _make_scan_inputs(batch=2, groups=1, per_group=4, d_state=2, length=40, seed=3)
    dout = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(1))
    y_one, grads_one = _run_scan(scan_triton.selective_scan, inputs, dout, delta_softplus=True)
    y_many, grads_many = _run_scan(scan_triton.selective_scan, inputs, dout, delta_softplus=True,
                                   chunk_size=16, block_t=8)
    assert _relative_error(y_many, y_one) <= 1e-6
    for name in SCAN_INPUTS:
        assert _relative_error(grads_many[name], grads_one[name]) <= 1e-5, name


def test_scan_length_one():
    inputs = _make_scan_inputs(batch=2, groups=2, per_group=3, d_state=4, length=1, seed=5)
    _assert_close_to_reference(inputs, tol=1e-5)


def test_scan_without_optional_inputs():
    inputs = _make_scan_inputs(batch=1, groups=2, per_group=4, d_state=2, length=20, seed=6)
    inputs["delta"] = inputs["delta"].abs() * 0.1      # already a positive step, no softplus
    inputs["D"] = None
    inputs["delta_bias"] = None
    _assert_close_to_reference(inputs, tol=1e-5, softplus=False)


def test_scan_bf16_inputs():
    inputs = _make_scan_inputs(batch=1, groups=2, per_group=4, d_state=4, length=24, dtype=torch.bfloat16, seed=8)
    # The reference reads the same bf16 values in float32, so only du / ddelta rounding to bf16 differs.
    _assert_close_to_reference(inputs, tol=1e-5, grad_tol=1e-2)
    y = scan_triton.selective_scan(*(inputs[k] for k in SCAN_INPUTS), delta_softplus=True,
                                   output_dtype=torch.bfloat16)
    y_ref = selective_scan_reference(*(inputs[k] for k in SCAN_INPUTS), delta_softplus=True)
    assert y.dtype == torch.bfloat16
    assert _relative_error(y, y_ref) <= 1e-2


def test_scan_non_contiguous_inputs():
    inputs = _make_scan_inputs(batch=2, groups=2, per_group=3, d_state=2, length=18, seed=9)
    # Same values, strided layouts: (B, L, C) storage seen as (B, C, L), and B/C sliced from a wider tensor.
    for name in ("u", "delta"):
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not inputs[name].is_contiguous()
    for name in ("B", "C"):
        wide = torch.zeros(*inputs[name].shape[:-1], 2 * inputs[name].shape[-1])
        wide[..., ::2] = inputs[name]
        inputs[name] = wide[..., ::2]
        assert not inputs[name].is_contiguous()
    inputs["A"] = inputs["A"].t().contiguous().t()
    _assert_close_to_reference(inputs, tol=1e-5)


def test_dispatcher_uses_triton_only_when_asked_on_cpu():
    assert scan_triton.is_available(torch.device("cpu"))           # the interpreter is on
    assert "triton" in kernels.available_backends("cpu")
    assert kernels.resolve_backend("auto", "cpu") != "triton"
    inputs = _make_scan_inputs(batch=1, groups=1, per_group=4, d_state=1, length=9, seed=10)
    args = [inputs[k] for k in SCAN_INPUTS]
    y = kernels.selective_scan(*args, delta_softplus=True, backend="triton")
    y_ref = selective_scan_reference(*args, delta_softplus=True)
    assert _relative_error(y, y_ref) <= 1e-5


def test_launch_heuristic_fills_the_gpu():
    for training in (False, True):
        # Batch 128 at 224x224, stage 0 of VMamba-T: enough programs without chunking, few masked lanes.
        block_d, _, block_t, chunk_len, n_chunks, n_blocks, *_ = scan_triton.choose_scan_config(
            128, 4, 96, 1, 3136, sm_count=132, training=training)
        assert n_chunks == 1 and chunk_len >= 3136
        assert 96 <= n_blocks * block_d <= 96 + 96 // 8
        assert 128 * 4 * n_blocks >= 4 * 132
        # Batch 1 at 1024x1024: the sequence is cut into chunks until ~4 programs per SM exist.
        block_d, _, block_t, chunk_len, n_chunks, n_blocks, *_ = scan_triton.choose_scan_config(
            1, 4, 96, 1, 65536, sm_count=132, training=training)
        assert 4 * n_blocks * n_chunks >= 4 * 132
        assert chunk_len % block_t == 0 and chunk_len >= 256 and chunk_len * n_chunks >= 65536
    # Training uses the backward's (shorter) tiles for the forward too; tiles never outgrow short sequences.
    assert scan_triton.choose_scan_config(128, 4, 96, 1, 3136, training=True)[2] <= \
        scan_triton.choose_scan_config(128, 4, 96, 1, 3136, training=False)[2]
    assert scan_triton.choose_scan_config(128, 4, 768, 1, 49)[2] <= 64
    # N = 16 keeps the register tile within budget with fewer channels per program.
    block_d, block_n, block_t, *_ = scan_triton.choose_scan_config(128, 4, 192, 16, 3136, sm_count=132)
    assert block_n == 16 and block_d * block_n * block_t <= 4096


# ----------------------------------------------------------------------------------------------
# Cross-scan / cross-merge
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(5, 7), (7, 5), (1, 4), (33, 3)])
def test_cross_scan_and_merge_match_reference(height, width):
    gen = torch.Generator().manual_seed(height * 100 + width)
    x = torch.randn(2, 3, height, width, generator=gen)
    assert torch.equal(scan_triton.cross_scan(x), cross_scan_reference(x))
    ys = torch.randn(2, 4, 3, height, width, generator=gen)
    torch.testing.assert_close(scan_triton.cross_merge(ys), cross_merge_reference(ys), rtol=1e-6, atol=1e-6)


def test_cross_scan_and_merge_channels_last():
    # The model's activations are NCHW-shaped with channels-last strides: read and written in place.
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 5, 6, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    assert torch.equal(scan_triton.cross_scan(x), cross_scan_reference(x))
    ys = torch.randn(2, 4, 5, 6, 3, generator=gen)
    merged = scan_triton.cross_merge(ys)
    assert merged.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(merged, cross_merge_reference(ys), rtol=1e-6, atol=1e-6)


def test_cross_scan_and_merge_gradients():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 2, 3, 6, generator=gen, requires_grad=True)
    g_seq = torch.randn(1, 4, 2, 18, generator=gen)
    (scan_triton.cross_scan(x) * g_seq).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (cross_scan_reference(x_ref) * g_seq).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)

    ys = torch.randn(1, 4, 2, 3, 6, generator=gen, requires_grad=True)
    g_map = torch.randn(1, 2, 3, 6, generator=gen)
    (scan_triton.cross_merge(ys) * g_map).sum().backward()
    ys_ref = ys.detach().clone().requires_grad_(True)
    (cross_merge_reference(ys_ref) * g_map).sum().backward()
    torch.testing.assert_close(ys.grad, ys_ref.grad, rtol=1e-6, atol=1e-6)


def test_cross_scan_bf16_and_dispatch():
    x = torch.randn(1, 2, 4, 5).to(torch.bfloat16)
    out = kernels.cross_scan(x, backend="triton")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, cross_scan_reference(x))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs (no GPU needed)
# ----------------------------------------------------------------------------------------------

# Default: every kernel at N = 1 (the v2 models) for sm_90 with bf16 activations and for sm_80 with
# float32 activations, the two compiles running side by side. VMAMBA_FULL_AOT=1 compiles the full
# matrix (both targets x both dtypes x N = 1 and 16): several minutes on a 2-core machine, because the
# N = 16 backward kernel alone takes ~15-60 s to build.
_FULL_AOT = os.environ.get("VMAMBA_FULL_AOT", "0") == "1"
_AOT_PLAN = ([(cap, io, (1, 16)) for cap in (80, 90) for io in ("fp32", "bf16")] if _FULL_AOT
             else [(90, "bf16", (1,)), (80, "fp32", (1,))])

_AOT_SCRIPT = """
import json, sys
from vmamba_cli.kernels.triton.aot import compile_kernels
cap, io, d_states = int(sys.argv[1]), sys.argv[2], tuple(int(n) for n in sys.argv[3].split(','))
print(json.dumps(compile_kernels(cap, io_dtypes=(io,), d_states=d_states)))
"""


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A fresh cache: the kernels are really compiled, not read back from an earlier run.
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    running = {
        plan: subprocess.Popen([sys.executable, "-c", _AOT_SCRIPT, str(plan[0]), plan[1],
                                ",".join(map(str, plan[2]))],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for plan in _AOT_PLAN
    }
    results = {}
    for plan, proc in running.items():
        out, err = proc.communicate(timeout=1800)
        results[plan] = (proc.returncode, out, err)
    return results


@pytest.mark.parametrize("cap,io,d_states", _AOT_PLAN)
def test_every_kernel_compiles_for_gpu(aot_results, cap, io, d_states):
    returncode, out, err = aot_results[(cap, io, d_states)]
    assert returncode == 0, err[-3000:]
    compiled = json.loads(out.strip().splitlines()[-1])
    expected = set()
    for n in d_states:
        for name in ("chunk_state", "scan_fwd", "bwd_chunk", "scan_bwd"):
            expected.add(f"{name}[N={n}]/{io}")
        for reverse in (False, True):
            expected.add(f"chunk_carry[N={n},reverse={reverse}]/fp32")
    if 1 in d_states:
        # The N = 1 forwards reading u from the map (the fused core), and loading one tile ahead
        # (the inference launch), both layouts.
        expected |= {f"{name}[N=1,map]/{io}" for name in ("chunk_state", "scan_fwd")}
        expected |= {f"scan_fwd[N=1{tag},prefetch]/{io}" for tag in ("", ",map")}
        # The fused core's inference forward forming delta itself.
        expected.add(f"scan_fwd[N=1,map,prefetch,dt_proj]/{io}")
    for merge in (False, True):
        expected.add(f"cross[merge={merge}]/{io}")
        expected.add(f"route[to_map={merge}]/{io}")
    expected |= {f"ln_fwd/{io}", f"ln_bwd/{io}"}
    assert set(compiled) == expected
    for label, info in compiled.items():
        assert info["cubin_bytes"] > 1000, label
        # Well inside the 228 KB of shared memory per SM on sm_90 (164 KB on sm_80).
        assert info["shared"] < 64 * 1024, label


@pytest.mark.parametrize("fused", [True, False])
def test_ss2d_core_with_triton_matches_torch_backend(fused):
    """The model's SS2D core (cross-scan, projections, scan, merge) through the Triton ops, fwd + bwd:
    the fused core (the default) and the composed one."""
    tuning = dataclasses.replace(DEFAULT_TUNING, fused_cross_scan=fused)
    gen = torch.Generator().manual_seed(12)
    batch, d_inner, height, width, d_state, rank, k = 1, 4, 3, 5, 1, 2, 4
    params = {
        "x_proj_weight": torch.randn(k, rank + 2 * d_state, d_inner, generator=gen) * 0.5,
        "dt_projs_weight": torch.randn(k, d_inner, rank, generator=gen) * 0.5,
        "dt_projs_bias": torch.randn(k, d_inner, generator=gen) * 0.5,
        "A_logs": torch.randn(k * d_inner, d_state, generator=gen) * 0.3,
        "Ds": torch.randn(k * d_inner, generator=gen),
    }
    x = torch.randn(batch, d_inner, height, width, generator=gen)
    g = torch.randn(batch, d_inner, height, width, generator=gen)
    results = {}
    for backend in ("triton", "torch"):
        leaves = {name: v.clone().requires_grad_(True) for name, v in {"x": x, **params}.items()}
        out = kernels.cross_selective_scan(*leaves.values(), backend=backend, tuning=tuning)
        (out * g).sum().backward()
        results[backend] = (out.detach(), {name: v.grad for name, v in leaves.items()})
    out_t, grads_t = results["triton"]
    out_ref, grads_ref = results["torch"]
    assert _relative_error(out_t, out_ref) <= 1e-5
    for name, grad in grads_ref.items():
        assert _relative_error(grads_t[name], grad) <= 1e-5, name


def _ss2d_params(d_inner, d_state, rank, seed, dtype=torch.float32):
    return ss2d_params(d_inner, d_state, rank, seed=seed)


def _core_outputs(core, x, params, g):
    leaves = {name: v.clone().requires_grad_(True) for name, v in {"x": x, **params}.items()}
    out = core(*leaves.values())
    (out.float() * g).sum().backward()
    return out.detach(), {name: v.grad for name, v in leaves.items()}


@pytest.mark.parametrize("height,width,channels_last,launch", [
    (3, 5, True, {}),
    (5, 3, False, {}),
    # 35 steps in 8-step tiles and 16-step chunks: both carry passes and the tile hand-over, with
    # every route's pixels crossing tile and chunk borders at different places.
    (7, 5, True, dict(chunk_size=16, block_t=8, block_d=4)),
    (5, 7, True, dict(chunk_size=16, block_t=8, block_d=4)),
])
def test_fused_core_reads_the_map_along_each_route(monkeypatch, height, width, channels_last, launch):
    """The d_state = 1 core's forward builds no cross-scan copies (its backward builds them);
    output and all six gradients equal the composed torch ops (which do build them)."""
    from vmamba_cli.kernels import compose_cross_selective_scan

    batch, d_inner, rank = 2, 6, 2
    params = _ss2d_params(d_inner, 1, rank, seed=21)
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(batch, d_inner, height, width, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(batch, d_inner, height, width, generator=gen)
    # The fused path must not fall back to the composed ops; its forward builds no cross-scan.
    layouts = []
    real_layout = ss2d.scan_layout
    monkeypatch.setattr(ss2d, "scan_layout", lambda *a, **k: layouts.append(a[0].shape) or real_layout(*a, **k))
    monkeypatch.setattr(ss2d, "_composed", lambda *a, **k: pytest.fail("composed ops ran"))
    leaves = {name: v.clone().requires_grad_(True) for name, v in {"x": x, **params}.items()}
    out_f = ss2d.cross_selective_scan(*leaves.values(), **launch)
    assert layouts == []
    (out_f.float() * g).sum().backward()
    assert len(layouts) == 2          # the backward's copies of x and of the gradient
    out_f, grads_f = out_f.detach(), {name: v.grad for name, v in leaves.items()}
    with torch.no_grad():   # inference launch: no tile states kept
        out_inference = ss2d.cross_selective_scan(x, *params.values(), **launch)
    assert len(layouts) == 2
    monkeypatch.undo()
    out_ref, grads_ref = _core_outputs(
        lambda *a: compose_cross_selective_scan(*a, backend="torch"), x, params, g)
    assert out_f.shape == out_ref.shape
    assert _relative_error(out_f, out_ref) <= 1e-5
    assert _relative_error(out_inference, out_ref) <= 1e-5
    for name, grad in grads_ref.items():
        assert grads_f[name].shape == grad.shape, name
        assert _relative_error(grads_f[name], grad) <= 1e-5, name


@pytest.mark.parametrize("height,width,rank", [(7, 5, 3), (5, 7, 3), (1, 1, 1)])
def test_fused_core_inference_forms_delta_in_the_kernel(monkeypatch, height, width, rank):
    """Inference through the fused core (fused_dt_proj, one chunk): the scan kernel projects the
    routed low-rank rows itself and reads B and C from them in place; no delta tensor, no matmul.
    Several channel blocks and tiles (35 steps in 8-step tiles), an odd rank, L = 1."""
    from vmamba_cli.kernels import compose_cross_selective_scan

    params = _ss2d_params(6, 1, rank, seed=25)
    x = torch.randn(2, 6, height, width, generator=torch.Generator().manual_seed(26))
    x = x.contiguous(memory_format=torch.channels_last)
    forwards = []
    real_forward = ss2d.scan_forward

    def spy(*args, **kwargs):
        forwards.append(kwargs.get("dt_proj"))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(ss2d, "scan_forward", spy)
    monkeypatch.setattr(ss2d.torch, "matmul", lambda *a, **k: pytest.fail("delta built by a matmul"))
    with torch.no_grad():
        out = ss2d.cross_selective_scan(x, *params.values(), tuning=DEFAULT_TUNING, block_t=8, block_d=4)
    monkeypatch.undo()
    assert DEFAULT_TUNING.fused_dt_proj
    assert len(forwards) == 1 and forwards[0] is not None and forwards[0].shape == (24, rank)
    expected = compose_cross_selective_scan(x, *params.values(), backend="torch")
    assert out.shape == expected.shape
    assert _relative_error(out, expected) <= 1e-5


def test_fused_core_bf16_and_switches(monkeypatch):
    """bf16 activations through the fused core (loose tolerance); the tuning switches: fused with
    and without a backward by default, composed with a backward when fused_training is off and
    throughout when fused_cross_scan is off."""
    from vmamba_cli.kernels import compose_cross_selective_scan

    params = _ss2d_params(4, 1, 2, seed=23)
    x = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(24))
    expected = compose_cross_selective_scan(x, *params.values(), backend="torch")
    actual = kernels.cross_selective_scan(x.bfloat16(), *params.values(), backend="triton")
    assert actual.dtype == torch.float32
    assert _relative_error(actual, expected) <= 5e-2
    calls = []
    monkeypatch.setattr(ss2d, "_TritonCrossScanMerge",
                        type("Spy", (), {"apply": staticmethod(lambda *a: calls.append(a))}))
    kernels.cross_selective_scan(x.clone().requires_grad_(True), *params.values(), backend="triton")
    assert len(calls) == 1
    # B and C reach the kernels as views of the routed projections (no copies), rows (R + 2) * L apart.
    B, C = calls[0][3], calls[0][4]
    assert not B.is_contiguous() and B.stride(1) == C.stride(1) == (2 + 2) * x.shape[2] * x.shape[3]
    tuning = dataclasses.replace(DEFAULT_TUNING, fused_dt_proj=False)
    kernels.cross_selective_scan(x, *params.values(), backend="triton", tuning=tuning)
    assert len(calls) == 2
    tuning = dataclasses.replace(tuning, fused_training=False)
    trained = kernels.cross_selective_scan(x.clone().requires_grad_(True), *params.values(), backend="triton",
                                           tuning=tuning)
    assert len(calls) == 2 and trained.requires_grad and _relative_error(trained.detach(), expected) <= 1e-5
    tuning = dataclasses.replace(tuning, fused_cross_scan=False)
    composed = kernels.cross_selective_scan(x, *params.values(), backend="triton", tuning=tuning)
    assert len(calls) == 2 and _relative_error(composed, expected) <= 1e-5
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_TUNING.fused_dt_proj = False


@pytest.mark.parametrize("height,width", [(3, 5), (4, 4)])
def test_route_projections_match_cross_scan(height, width):
    """Slice k of the per-pixel projections laid out along route k, and the gradient back."""
    gen = torch.Generator().manual_seed(25)
    batch, per_route = 2, 3
    proj = torch.randn(batch, height, width, 4 * per_route, generator=gen, requires_grad=True)
    seq = ss2d._RouteProjections.apply(proj)
    every_route = cross_scan_reference(proj.detach().permute(0, 3, 1, 2))   # (B, 4, 4*C, L)
    expected = torch.stack([every_route[:, k, k * per_route:(k + 1) * per_route] for k in range(4)], dim=1)
    assert torch.equal(seq.detach(), expected)
    grad = torch.randn(seq.shape, generator=gen)
    (seq * grad).sum().backward()
    proj_ref = proj.detach().clone().requires_grad_(True)
    routes = cross_scan_reference(proj_ref.permute(0, 3, 1, 2))
    (torch.stack([routes[:, k, k * per_route:(k + 1) * per_route] for k in range(4)], dim=1) * grad).sum().backward()
    assert torch.equal(proj.grad, proj_ref.grad)


# ----------------------------------------------------------------------------------------------
# Channel LayerNorm (rows of a channels-last map)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,channels", [(37, 96), (3, 768), (64, 24)])
def test_layer_norm_rows_matches_torch(rows, channels):
    from vmamba_cli.kernels.triton.layernorm import layer_norm_rows

    gen = torch.Generator().manual_seed(rows + channels)
    x = (torch.randn(rows, channels, generator=gen) * 3 + 1).requires_grad_(True)
    weight = torch.randn(channels, generator=gen).requires_grad_(True)
    bias = torch.randn(channels, generator=gen).requires_grad_(True)
    dout = torch.randn(rows, channels, generator=gen)
    results = []
    for fn in (layer_norm_rows, lambda *a: torch.nn.functional.layer_norm(a[0], (channels,), *a[1:])):
        for t in (x, weight, bias):
            t.grad = None
        y = fn(x, weight, bias, 1e-5)
        (y * dout).sum().backward()
        results.append([y.detach()] + [t.grad.clone() for t in (x, weight, bias)])
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), *results):
        assert _relative_error(got, want) <= 1e-5, name


def test_layer_norm_rows_low_precision_input():
    from vmamba_cli.kernels.triton.layernorm import layer_norm_rows

    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    weight, bias = torch.ones(40), torch.zeros(40)
    y = layer_norm_rows(x, weight, bias)
    assert y.dtype == torch.bfloat16
    assert _relative_error(y, torch.nn.functional.layer_norm(x.float(), (40,), weight, bias)) <= 1e-2


def test_layer_norm_rows_output_dtype():
    """out_dtype writes the normalised rows in another dtype: the float32 result rounded once,
    bit for bit; the gradient still reaches x in x's dtype."""
    from vmamba_cli.kernels.triton.layernorm import layer_norm_rows

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 24, generator=gen).requires_grad_(True)
    weight, bias = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    y = layer_norm_rows(x, weight, bias, 1e-5, torch.float16)
    assert y.dtype == torch.float16
    assert torch.equal(y, layer_norm_rows(x, weight, bias, 1e-5).half())
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
