"""Export: the chunked closed-form scan, ONNX files run by onnxruntime, torch.export programs, `vmamba export`.

ONNX parity is checked for every released configuration: shrunk (one block per stage, a quarter or
less of the widths) with each configuration's structural flags kept, and vmamba-tiny and
vmamba-v0-tiny at full size. Classifier heads are scaled up so that logits are of order 1-10 and the
1e-4 tolerance is a real constraint.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

from vmamba_cli import kernels  # noqa: E402
from vmamba_cli.cli import app  # noqa: E402
from vmamba_cli.export import (ExportError, OnnxClassifier, PreprocessPreset, _require, export_onnx,  # noqa: E402
                               export_pt2, graph_node_count)
from vmamba_cli.kernels.chunked import linear_recurrence_closed, selective_scan_chunked  # noqa: E402
from vmamba_cli.model import MODELS, VSSM, from_official_config, get_model_spec  # noqa: E402
from vmamba_cli.weights import checkpoint_filter_fn, save_model  # noqa: E402

TOL = 1e-4
runner = CliRunner()


# ------------------------------------------------------------------------------------------------
# The chunked scan itself
# ------------------------------------------------------------------------------------------------

def _scan_inputs(batch, groups, per_group, d_state, length, seed=0, bias_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    channels = groups * per_group
    return dict(
        u=torch.randn(batch, channels, length, generator=g),
        delta=torch.randn(batch, channels, length, generator=g),
        A=-torch.exp(torch.randn(channels, d_state, generator=g)),
        B=torch.randn(batch, groups, d_state, length, generator=g),
        C=torch.randn(batch, groups, d_state, length, generator=g),
        D=torch.randn(channels, generator=g),
        delta_bias=torch.randn(channels, generator=g) + bias_shift,
    )


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("length,d_state,bias_shift", [
    (1, 1, 0.0), (15, 4, 0.0), (37, 16, 0.0), (300, 16, 0.0), (4096, 1, 0.0),
    # dt around 1e-3: the state remembers thousands of steps, so the chunk carries matter.
    (4096, 2, -7.0),
])
def test_chunked_scan_matches_reference(length, d_state, bias_shift):
    t = _scan_inputs(2 if length < 1000 else 1, 4, 3, d_state, length, bias_shift=bias_shift)
    ref = kernels.selective_scan(**t, delta_softplus=True, backend="reference")
    out = kernels.selective_scan(**t, delta_softplus=True, backend="chunked")
    direct = selective_scan_chunked(**t, delta_softplus=True)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= 1e-5
    assert torch.equal(out, direct)


def test_chunked_scan_gradients_match_reference():
    t = _scan_inputs(2, 4, 2, 4, 75, seed=1)
    weight = torch.linspace(-1, 1, 75)

    def grads(backend):
        xs = {k: v.clone().requires_grad_() for k, v in t.items()}
        y = kernels.selective_scan(**xs, delta_softplus=True, backend=backend)
        (y * weight).sum().backward()
        return {k: v.grad for k, v in xs.items()}

    ref, got = grads("reference"), grads("chunked")
    for key in t:
        assert _rel(got[key], ref[key]) <= 1e-5, key


def test_closed_form_recurrence_survives_strong_decay():
    # Log-decays of -1e4 per step: any exp of a positive difference would overflow to inf.
    a = torch.full((1, 1, 1, 100), -1e4)
    a[..., ::7] = 0.0
    x = torch.randn(1, 1, 1, 100)
    h = linear_recurrence_closed(a, x)
    expected, state = torch.empty_like(x), torch.zeros(1, 1, 1)
    for i in range(100):
        state = torch.exp(a[..., i]) * state + x[..., i]
        expected[..., i] = state
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, expected)


def test_chunked_backend_is_registered_but_never_auto():
    assert "chunked" in kernels.available_backends("cpu")
    assert kernels.resolve_backend("auto", "cpu") != "chunked"


# ------------------------------------------------------------------------------------------------
# ONNX parity
# ------------------------------------------------------------------------------------------------

def _shrunk(name: str):
    cfg = get_model_spec(name).config
    return cfg.replace(depths=(1, 1, 1, 1), dims=tuple(d // 8 for d in cfg.dims), num_classes=37)


def _prepared(model: VSSM, seed: int) -> VSSM:
    """A model whose logits span a few units (the official init gives about +-0.5)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.classifier.head.weight.mul_(1000.0 / model.num_features)
    return model.eval()


_EXPORTS: dict = {}


def _exported(key, build, tmp_path_factory, resolution=64):
    if key not in _EXPORTS:
        model = build()
        path = tmp_path_factory.mktemp("onnx") / f"{key}.onnx"
        export_onnx(model, path, resolution=resolution, name=key, class_names=[f"c{i}" for i in range(
            model.config.num_classes)])
        _EXPORTS[key] = model, path
    return _EXPORTS[key]


def _check_parity(model, path, shapes):
    clf = OnnxClassifier(path)
    for i, shape in enumerate(shapes):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            ref = model(x).numpy()
        out = clf(x)
        assert out.shape == ref.shape
        err = float(np.abs(out - ref).max())
        assert err <= TOL, f"{shape}: max |onnx - torch| = {err:.2e} (logits up to {np.abs(ref).max():.1f})"


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_parity_every_released_config_shrunk(name, tmp_path_factory):
    seed = list(MODELS).index(name)
    model, path = _exported(name, lambda: _prepared(VSSM(_shrunk(name)), seed), tmp_path_factory)
    # batch 1 square, batch 3 non-square both ways
    _check_parity(model, path, [(1, 3, 64, 64), (3, 3, 64, 96), (3, 3, 96, 64)])


@pytest.mark.parametrize("name", ["vmamba-tiny", "vmamba-v0-tiny"])
def test_onnx_parity_full_size(name, tmp_path_factory):
    model, path = _exported(f"{name}-full", lambda: _prepared(VSSM(get_model_spec(name).config), 0),
                            tmp_path_factory)
    _check_parity(model, path, [(1, 3, 64, 64), (3, 3, 64, 96)])


def test_onnx_golden_fixture(fixtures_dir, tmp_path):
    with safe_open(str(fixtures_dir / "vmamba_v2_small_ref.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = from_official_config(config).eval()
    model.load_state_dict(checkpoint_filter_fn(tensors), strict=True)
    path = export_onnx(model, tmp_path / "golden.onnx", resolution=64)
    logits = OnnxClassifier(path)(tensors["input"])
    assert float(np.abs(logits - tensors["logits"].numpy()).max()) <= TOL


def test_onnx_graph_is_standard_and_independent_of_image_size(tmp_path_factory):
    model, path = _exported("vmamba-tiny", lambda: _prepared(VSSM(_shrunk("vmamba-tiny")), 6), tmp_path_factory)
    other = export_onnx(model, tmp_path_factory.mktemp("onnx") / "other.onnx", resolution=(128, 96))
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert not proto.functions
    # One fixed graph: the scan is not unrolled over the sequence, whatever the example size.
    assert graph_node_count(path) == graph_node_count(other)
    assert 100 < graph_node_count(path) < 5000
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 3 and all(d.dim_param for d in (dims[0], dims[2], dims[3]))


def test_onnx_metadata(tmp_path_factory):
    model, path = _exported("vmamba-tiny", lambda: _prepared(VSSM(_shrunk("vmamba-tiny")), 6), tmp_path_factory)
    clf = OnnxClassifier(path)
    assert clf.name == "vmamba-tiny"
    assert clf.class_names == [f"c{i}" for i in range(37)]
    assert clf.num_classes == 37
    assert clf.preprocess == PreprocessPreset(resolution=64)
    assert json.loads(clf.metadata["config"])["dims"] == list(model.config.dims)


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match=r'pip install "vmamba\[export\]"') as info:
        _require("onnxruntime")
    assert "\n" not in str(info.value)


def test_onnx_classifier_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="bad.onnx"):
        OnnxClassifier(bad)
    with pytest.raises(ExportError, match="no such file"):
        OnnxClassifier(tmp_path / "missing.onnx")


# ------------------------------------------------------------------------------------------------
# torch.export
# ------------------------------------------------------------------------------------------------

def test_pt2_round_trip_other_batch_and_size(tmp_path):
    model = _prepared(VSSM(_shrunk("vmamba-v0-tiny")), 3)
    path = export_pt2(model, tmp_path / "m.pt2", resolution=64)
    program = torch.export.load(str(path))
    for shape in [(3, 3, 96, 64), (1, 3, 64, 128)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x)
            out = program.module()(x)
        torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def test_cli_export_onnx_from_saved_weights(tmp_path):
    model = _prepared(VSSM(_shrunk("vmamba-tiny-s2l5")), 4)
    weights = save_model(tmp_path / "w.safetensors", model, name="vmamba-tiny-s2l5",
                         class_names=[f"k{i}" for i in range(37)])
    out = tmp_path / "out" / "m.onnx"
    result = runner.invoke(app, ["export", "--weights", str(weights), "--format", "onnx", "--out", str(out),
                                 "--resolution", "64"])
    assert result.exit_code == 0, result.output
    clf = OnnxClassifier(out)
    assert clf.class_names[:2] == ["k0", "k1"] and clf.name == "vmamba-tiny-s2l5"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert float(np.abs(clf(x) - model(x).numpy()).max()) <= TOL
    assert [p.name for p in out.parent.iterdir()] == ["m.onnx"]     # no temporary left behind


def test_cli_export_bad_input_is_one_line(tmp_path):
    result = runner.invoke(app, ["export", "--weights", str(tmp_path / "nope.safetensors"), "--format", "onnx",
                                 "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1
    assert "nope.safetensors" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
    result = runner.invoke(app, ["export", "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                                 "--resolution", "100"])
    assert result.exit_code == 1 and "multiple of 32" in result.output
