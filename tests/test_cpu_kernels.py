"""The native CPU scan (backend "cpu"): plain and fused entries, forward and every gradient.

Oracles: the sequential reference (`selective_scan_reference`, `compose_cross_selective_scan` with
backend "reference"), the official scan fixture and the golden model fixture. The first test in a
fresh cache compiles the kernel (a few seconds); tests that need it skip if no compiler exists.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from conftest import assert_close_to_max, grads_of, load_golden, make_scan_inputs, ss2d_params

from vmamba_cli.kernels import compose_cross_selective_scan, resolve_backend
from vmamba_cli.kernels import cpu as scan_cpu
from vmamba_cli.kernels import selective_scan as dispatch_selective_scan
from vmamba_cli.kernels.cpu import build, plan
from vmamba_cli.kernels.reference import selective_scan_reference

needs_native = pytest.mark.skipif(scan_cpu.load_library() is None,
                                  reason=f"native CPU scan not built: {build._state['reason']}")


def scan_inputs(batch, groups, per_group, d_state, length, seed=0, wide_delta=False):
    return make_scan_inputs(batch, groups, per_group, d_state, length, seed=seed, wide_delta=wide_delta)


# --------------------------------------------------------------------------------------------
# Plain selective_scan
# --------------------------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("prefix", ["", "n1.", "n16."])
def test_scan_fixture_forward_and_gradients(fixtures_dir, prefix):
    with safe_open(str(fixtures_dir / "selective_scan_ref.safetensors"), "pt") as f:
        ref = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix) and "." not in k[len(prefix):]}
    inputs = {k: ref[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")}
    y, grads = grads_of(lambda **kw: scan_cpu.selective_scan(**kw, delta_softplus=True), inputs, ref["dout"])
    assert_close_to_max(y, ref["y"], name="y")
    for name in inputs:
        assert_close_to_max(grads[name], ref["d" + name], name=f"d{name}")


@needs_native
@pytest.mark.parametrize("batch,groups,per_group,d_state,length", [
    (2, 4, 5, 1, 37),      # N = 1 (v2), odd channels (vector tail) and odd L
    (1, 4, 16, 16, 45),    # N = 16 (v0), more than one backward chunk
    (2, 2, 9, 4, 1),       # L = 1
    (1, 1, 140, 1, 70),    # channels split into several blocks
])
@pytest.mark.parametrize("softplus", [True, False])
def test_plain_scan_matches_reference(batch, groups, per_group, d_state, length, softplus):
    inputs = scan_inputs(batch, groups, per_group, d_state, length, wide_delta=softplus)
    if not softplus:  # raw steps must stay positive
        inputs["delta"] = inputs["delta"].abs() * 0.1
        inputs["delta_bias"] = inputs["delta_bias"].abs() * 0.1
    upstream = torch.randn(batch, groups * per_group, length)
    y, grads = grads_of(lambda **kw: scan_cpu.selective_scan(**kw, delta_softplus=softplus), inputs, upstream)
    y_ref, grads_ref = grads_of(lambda **kw: selective_scan_reference(**kw, delta_softplus=softplus), inputs, upstream)
    assert_close_to_max(y, y_ref, name="y")
    for name in grads_ref:
        assert_close_to_max(grads[name], grads_ref[name], name=f"d{name}")


@needs_native
def test_plain_scan_optional_inputs_and_dtypes():
    inputs = scan_inputs(1, 2, 8, 2, 19)
    inputs["D"] = inputs["delta_bias"] = None
    upstream = torch.randn(1, 16, 19)
    y, grads = grads_of(lambda **kw: scan_cpu.selective_scan(**kw, delta_softplus=True), inputs, upstream)
    y_ref, grads_ref = grads_of(lambda **kw: selective_scan_reference(**kw, delta_softplus=True), inputs, upstream)
    assert set(grads) == set(grads_ref)
    assert_close_to_max(y, y_ref)
    for name in grads_ref:
        assert_close_to_max(grads[name], grads_ref[name], name=name)
    # bf16 inputs are upcast; the output dtype follows output_dtype.
    half = {k: (v.bfloat16() if k in ("u", "delta", "B", "C") else v) for k, v in scan_inputs(1, 2, 8, 2, 19).items()}
    y16 = scan_cpu.selective_scan(**half, delta_softplus=True, output_dtype=torch.bfloat16)
    assert y16.dtype == torch.bfloat16
    y32 = selective_scan_reference(**{k: v.float() for k, v in half.items()}, delta_softplus=True)
    assert_close_to_max(y16.float(), y32, rel=1e-2)


@needs_native
def test_auto_backend_picks_cpu_for_cpu_tensors():
    assert resolve_backend("auto", "cpu") == "cpu"
    inputs = scan_inputs(1, 4, 3, 1, 11)
    torch.testing.assert_close(dispatch_selective_scan(**inputs, delta_softplus=True, backend="cpu"),
                               selective_scan_reference(**inputs, delta_softplus=True), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Fused cross_selective_scan
# --------------------------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("batch,d_inner,height,width,d_state,rank", [
    (2, 5, 3, 4, 1, 2),      # H != W, odd channel count
    (1, 16, 5, 7, 16, 3),    # N = 16, odd sizes
    (1, 9, 1, 1, 1, 2),      # L = 1
    (1, 11, 1, 6, 1, 1),     # a single row
    (2, 136, 3, 5, 1, 9),    # several channel blocks per sample
    (1, 8, 9, 8, 2, 2),      # L = 72 > one backward chunk
])
def test_fused_matches_composed_reference(batch, d_inner, height, width, d_state, rank):
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(batch, d_inner, height, width, generator=g), **ss2d_params(d_inner, d_state, rank))
    upstream = torch.randn(batch, d_inner, height, width, generator=g)
    y, grads = grads_of(scan_cpu.cross_selective_scan, inputs, upstream)
    y_ref, grads_ref = grads_of(lambda **kw: compose_cross_selective_scan(**kw, backend="reference"), inputs, upstream)
    assert_close_to_max(y, y_ref, name="y")
    assert set(grads) == {"x", "x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"}
    for name in grads:
        assert_close_to_max(grads[name], grads_ref[name], name=f"d{name}")


@needs_native
def test_every_vector_group_tail():
    """Blocks of 1-17 channel vectors, the last one full or partial: every halving tail piece
    (8, 4, 2, 1 vectors, full or not) of the kernel's channel groups, forward and backward."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one block per sample: the block holds every channel
    try:
        for n_vectors in range(1, 18):
            for d_inner in sorted({8 * n_vectors, 8 * n_vectors - 3}):
                g = torch.Generator().manual_seed(d_inner)
                inputs = dict(x=torch.randn(1, d_inner, 2, 3, generator=g), **ss2d_params(d_inner, 1, 2))
                upstream = torch.randn(1, d_inner, 2, 3, generator=g)
                y, grads = grads_of(scan_cpu.cross_selective_scan, inputs, upstream)
                y_ref, grads_ref = grads_of(lambda **kw: compose_cross_selective_scan(**kw, backend="reference"),
                                            inputs, upstream)
                assert_close_to_max(y, y_ref, name=f"y, {d_inner} channels")
                for name in ("x", "dt_projs_weight", "Ds"):
                    assert_close_to_max(grads[name], grads_ref[name], name=f"d{name}, {d_inner} channels")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_block_size_covers_channels_and_feeds_threads(threads):
    for channels in (8, 24, 48, 96, 136, 192, 384, 768):
        for batch in (1, 2, 3, 8):
            block = plan.block_size(channels, batch, threads)
            n_blocks = -(-channels // block)
            assert block % 8 == 0 and block <= plan.MAX_BLOCK, (channels, batch, block)
            assert (n_blocks - 1) * block < channels  # no empty block
            assert batch * n_blocks >= min(threads, batch * -(-channels // 8))  # every thread gets work


@pytest.mark.parametrize("threads,channels,batch,tasks", [
    (2, 384, 1, 4),   # 3 blocks of 128 would take two rounds on two threads
    (2, 96, 1, 2),
    (2, 192, 1, 2),
    (4, 768, 1, 8),   # not 6 blocks of 128 on four threads
    (3, 192, 1, 3),
    (2, 96, 3, 6),    # 3 samples x 1 block: odd, so two blocks each
    (2, 96, 8, 8),    # enough tasks already
])
def test_block_size_balances_few_tasks(threads, channels, batch, tasks):
    assert batch * -(-channels // plan.block_size(channels, batch, threads)) == tasks


@needs_native
@pytest.mark.parametrize("route_groups", [1, 2, 4])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,d_inner,height,width,d_state,block", [
    (2, 20, 3, 5, 1, 8),     # several blocks, a partial last one
    (1, 16, 9, 8, 1, 16),    # L = 72 > one backward chunk
    (1, 8, 4, 3, 16, 8),     # N = 16
])
def test_fused_route_groups_match_reference(route_groups, threads, batch, d_inner, height, width, d_state, block):
    """Directions split into 1, 2 or 4 task groups, each summing into its own slice of y / du."""
    tasks = (block, route_groups)
    g = torch.Generator().manual_seed(route_groups)
    inputs = dict(x=torch.randn(batch, d_inner, height, width, generator=g), **ss2d_params(d_inner, d_state, 2))
    upstream = torch.randn(batch, d_inner, height, width, generator=g)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, grads = grads_of(lambda **kw: scan_cpu.cross_selective_scan(**kw, tasks=tasks), inputs, upstream)
        with torch.inference_mode():
            y_inference = scan_cpu.cross_selective_scan(**inputs, tasks=tasks)
    finally:
        torch.set_num_threads(saved)
    y_ref, grads_ref = grads_of(lambda **kw: compose_cross_selective_scan(**kw, backend="reference"), inputs, upstream)
    assert_close_to_max(y, y_ref, name="y")
    assert_close_to_max(y_inference, y_ref, name="y (inference)")
    for name in grads:
        assert_close_to_max(grads[name], grads_ref[name], name=f"d{name}")


@needs_native
def test_fused_kernel_rejects_route_groups_not_dividing_four():
    params = ss2d_params(8, 1, 2)
    with pytest.raises(RuntimeError, match="inconsistent sizes"):
        with torch.inference_mode():
            scan_cpu.cross_selective_scan(torch.randn(1, 8, 2, 2), *params.values(), tasks=(8, 3))


@pytest.mark.parametrize("threads,channels,batch,expected", [
    (2, 96, 1, (96, 2)),     # not two blocks of 48: one 96-wide block, directions in two groups
    (2, 96, 8, (96, 1)),     # enough tasks already
    (2, 192, 1, (96, 1)),    # two full-width blocks already
    (1, 96, 1, (96, 1)),     # one thread: one task
    (16, 96, 1, (24, 4)),    # many threads: four route groups of 4 blocks
    (4, 96, 1, (96, 4)),     # four threads: one full-width block per direction
    (2, 8, 1, (8, 1)),       # one vector: nothing wider to gain
])
def test_fused_tasks_split_directions_for_narrow_blocks(threads, channels, batch, expected):
    assert plan.fused_tasks(channels, batch, threads) == expected


@needs_native
def test_fused_layouts_threads_and_no_grad():
    """Channels-last or contiguous input, 1 or 2 threads, inference mode: the same numbers."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 24, 6, 5, generator=g)
    params = ss2d_params(24, 1, 2)
    expected = compose_cross_selective_scan(x, *params.values(), backend="reference")
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for layout in (torch.contiguous_format, torch.channels_last):
                with torch.inference_mode():
                    y = scan_cpu.cross_selective_scan(x.contiguous(memory_format=layout), *params.values())
                assert_close_to_max(y, expected, name=f"{n_threads} threads, {layout}")
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="dt_projs_weight"):
        scan_cpu.cross_selective_scan(x, params["x_proj_weight"], params["dt_projs_weight"][:, :5],
                                      *list(params.values())[2:])


@needs_native
def test_parameter_cache_follows_in_place_updates():
    """Derived parameters are cached for inference; an optimizer-style in-place update invalidates them."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 8, 4, 3, generator=g)
    params = {k: torch.nn.Parameter(v) for k, v in ss2d_params(8, 2, 2).items()}
    for _ in range(2):
        with torch.no_grad():
            y = scan_cpu.cross_selective_scan(x, *params.values())
            assert_close_to_max(y, compose_cross_selective_scan(x, *params.values(), backend="reference"))
            params["A_logs"].add_(0.5)
            params["dt_projs_weight"].mul_(-1.5)


@needs_native
def test_parameters_created_under_inference_mode():
    """Inference tensors have no version counter: nothing is cached, updates are still seen."""
    g = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        x = torch.randn(1, 8, 4, 3, generator=g)
        params = ss2d_params(8, 1, 2)
        for _ in range(2):
            y = scan_cpu.cross_selective_scan(x, *params.values())
            assert_close_to_max(y, compose_cross_selective_scan(x, *params.values(), backend="reference"))
            params["A_logs"].add_(0.5)


# --------------------------------------------------------------------------------------------
# Fallback when the build fails
# --------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_build_state(monkeypatch, tmp_path):
    """A process that has not tried to build yet, with an empty cache."""
    for key, value in (("tried", False), ("lib", None), ("reason", None)):
        monkeypatch.setitem(build._state, key, value)
    monkeypatch.setenv("VMAMBA_HOME", str(tmp_path))
    monkeypatch.delenv("VMAMBA_NO_NATIVE", raising=False)
    return tmp_path


def test_failed_build_falls_back_with_one_line(fresh_build_state, monkeypatch, capfd, tmp_path):
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'fatal error: simulated compiler failure' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(build, "_compiler", lambda: str(broken))

    assert not scan_cpu.is_available("cpu")
    assert not scan_cpu.is_available("cpu")  # tried once per process: no second attempt, no second line
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "native CPU scan kernel unavailable" in lines[0] and "simulated compiler failure" in lines[0]
    assert "PyTorch" in lines[0]
    assert resolve_backend("auto", "cpu") == "torch"

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 3, 5, generator=g, requires_grad=True)
    params = ss2d_params(6, 1, 2)
    y = scan_cpu.cross_selective_scan(x, *params.values())  # still computes, via the torch backend
    expected = compose_cross_selective_scan(x, *params.values(), backend="reference")
    assert_close_to_max(y, expected.detach())
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    inputs = scan_inputs(1, 2, 3, 1, 9)
    assert_close_to_max(scan_cpu.selective_scan(**inputs, delta_softplus=True),
                        selective_scan_reference(**inputs, delta_softplus=True))
    assert capfd.readouterr().err == ""
    assert not list(tmp_path.glob("kernels/*.so"))


def test_no_compiler_and_opt_out(fresh_build_state, monkeypatch, capfd):
    monkeypatch.setattr(build, "_compiler", lambda: None)
    assert scan_cpu.load_library() is None
    assert "no C++ compiler" in capfd.readouterr().err
    for key, value in (("tried", False), ("lib", None), ("reason", None)):
        monkeypatch.setitem(build._state, key, value)
    monkeypatch.setenv("VMAMBA_NO_NATIVE", "1")
    assert not scan_cpu.is_available("cpu")
    assert scan_cpu.native_status()["reason"] == "disabled by VMAMBA_NO_NATIVE"
    assert capfd.readouterr().err == ""  # asked for: no warning


@needs_native
def test_build_is_cached_and_reused(fresh_build_state, monkeypatch):
    """A fresh process finds the compiled library in the cache instead of compiling again."""
    assert scan_cpu.load_library() is not None
    built = list(fresh_build_state.glob("kernels/*.so"))
    assert len(built) == 1
    for key, value in (("tried", False), ("lib", None), ("reason", None)):
        monkeypatch.setitem(build._state, key, value)
    monkeypatch.setattr(build, "_compile", lambda *a: pytest.fail("compiled twice"))
    assert scan_cpu.load_library() is not None
    assert not scan_cpu.is_available("meta")


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------

@needs_native
def test_model_matches_golden_fixture_with_cpu_backend(fixtures_dir):
    model, tensors = load_golden(fixtures_dir)
    model.set_scan_backend("cpu")
    with torch.inference_mode():
        logits = model(tensors["input"])
        features = model.forward_features(tensors["input"])
    torch.testing.assert_close(logits, tensors["logits"], atol=1e-5, rtol=0)
    for i, feature in enumerate(features):
        torch.testing.assert_close(feature, tensors[f"features.stage{i}"], atol=1e-4, rtol=1e-5)

    # Training through the fused kernel gives the gradients of the PyTorch path.
    model.train()
    x = tensors["input"][:1]
    grads = {}
    for backend in ("cpu", "torch"):
        model.zero_grad()
        model.set_scan_backend(backend)
        torch.manual_seed(0)  # same DropPath draws
        model(x).square().sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["cpu"].keys() == grads["torch"].keys()
    for name, grad in grads["torch"].items():
        assert_close_to_max(grads["cpu"][name], grad, rel=1e-4, name=name)
    assert math.isfinite(sum(g.abs().sum().item() for g in grads["cpu"].values()))


@needs_native
def test_fused_scan_under_cpu_autocast_matches_float32():
    """Autocast must not feed bf16 buffers to the float32 kernel (it would read garbage)."""
    g = torch.Generator().manual_seed(5)
    d, rank = 8, 2
    x = torch.randn(2, d, 5, 6, generator=g)
    params = (torch.randn(4, rank + 2, d, generator=g) * 0.5, torch.randn(4, d, rank, generator=g) * 0.5,
              torch.randn(4, d, generator=g) * 0.3, torch.randn(4 * d, 1, generator=g) * 0.1, torch.randn(4 * d, generator=g))
    expect = compose_cross_selective_scan(x, *params, backend="reference")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = scan_cpu.cross_selective_scan(x.bfloat16(), *params)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expect, atol=0.1, rtol=0.05)
