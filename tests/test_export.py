"""Export: the ONNX lowering of the SS2D core, ONNX files run by onnxruntime, torch.export programs,
`vmamba export`, and ONNX files in `vmamba predict`, `vmamba eval` and `vmamba profile --runtime onnxruntime`.

ONNX parity is checked for every released configuration: shrunk (one block per stage, an eighth of
the widths) with each configuration's structural flags kept, exported dynamic and run at batch 1
and 3, square and non-square both ways; vmamba-tiny and vmamba-v0-tiny at full size and the golden
fixture, exported at a fixed size (tracing with symbolic sizes costs several times more, and the
core lowering emits the same shape-generic ONNX either way: every size is read with Shape at run
time). Classifier heads are scaled up so that logits are of order 1-10 and the 1e-4 tolerance is a
real constraint.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

from vmamba_cli import kernels  # noqa: E402
from vmamba_cli.cli import app  # noqa: E402
from vmamba_cli.errors import VMambaError  # noqa: E402
from vmamba_cli.evaluate import evaluate  # noqa: E402
from vmamba_cli.export import (ExportError, OnnxClassifier, _require, export_onnx, export_program,  # noqa: E402
                               graph_node_count, onnx_model_proto)
from vmamba_cli.model import Preprocess  # noqa: E402
from vmamba_cli.predict import predict  # noqa: E402
from vmamba_cli.profile import profile  # noqa: E402
from vmamba_cli.model import MODELS, VSSM, VMambaConfig, get_model_spec  # noqa: E402
from vmamba_cli.weights import save_model  # noqa: E402
from conftest import load_golden  # noqa: E402

TOL = 1e-4
runner = CliRunner()


# ------------------------------------------------------------------------------------------------
# ONNX parity: every released configuration, the full-size tiny models and the golden fixture
# ------------------------------------------------------------------------------------------------

FULL = ("vmamba-tiny", "vmamba-v0-tiny")
DYNAMIC_SHAPES = [(1, 3, 64, 64), (3, 3, 64, 96), (3, 3, 96, 64)]   # batch 1 square, batch 3 non-square both ways
BUNDLE_SHAPE = (2, 3, 64, 64)                  # fixed-size exports: the golden fixture's input


def _shrunk(name: str, num_classes: int = 37):
    cfg = get_model_spec(name).config
    return cfg.replace(depths=(1, 1, 1, 1), dims=tuple(d // 8 for d in cfg.dims), num_classes=num_classes)


def _prepared(model: VSSM, seed: int) -> VSSM:
    """A model whose logits span a few units (the official init gives about +-0.5)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.classifier.head.weight.mul_(1000.0 / model.num_features)
    return model.eval()


def _build(config: VMambaConfig, seed: int) -> VSSM:
    torch.manual_seed(seed)
    return _prepared(VSSM(config), seed)


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return load_golden(fixtures_dir)


_EXPORTS: dict = {}


def _exported(key, build, tmp_path_factory, *, dynamic=True):
    """The model ``build()`` and its onnxruntime classifier, exported once per key for the module."""
    if key not in _EXPORTS:
        model = build()
        path = tmp_path_factory.mktemp("onnx") / f"{key}.onnx"
        export_onnx(model, path, resolution=64, dynamic=dynamic, batch=2 if dynamic else BUNDLE_SHAPE[0], name=key)
        _EXPORTS[key] = model, OnnxClassifier(path), path
    return _EXPORTS[key]


def _check_parity(model, clf, shapes):
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
    model, clf, _ = _exported(name, lambda: _build(_shrunk(name), seed), tmp_path_factory)
    _check_parity(model, clf, DYNAMIC_SHAPES)


@pytest.mark.parametrize("name", FULL)
def test_onnx_parity_full_size(name, tmp_path_factory):
    # Fixed-size export (tracing with symbolic sizes costs several times more; the dynamic graph is
    # checked on every shrunk configuration above).
    model, clf, _ = _exported(f"{name}-full", lambda: _build(get_model_spec(name).config, 0), tmp_path_factory,
                              dynamic=False)
    _check_parity(model, clf, [BUNDLE_SHAPE])


def test_onnx_golden_fixture(golden, tmp_path_factory):
    model, tensors = golden
    _, clf, _ = _exported("golden", lambda: model, tmp_path_factory, dynamic=False)
    assert float(np.abs(clf(tensors["input"]) - tensors["logits"].numpy()).max()) <= TOL


class _CoreOnly(torch.nn.Module):
    """One SS2D core (four routes, projections, scan, merge) with fixed random parameters.

    ``memory`` "long": step sizes around 1e-3 and |A| about 1, so the state carries over thousands
    of steps and every line's starting state (the carry across lines) matters; "short": |A| up to
    e^3 and step sizes around 1, decays near zero.
    """

    def __init__(self, d_inner: int, d_state: int, rank: int, memory: str, backend: str = "auto"):
        super().__init__()
        g = torch.Generator().manual_seed(d_state)
        long = memory == "long"
        self.backend = backend
        self.register_buffer("x_proj_weight", torch.randn(4, rank + 2 * d_state, d_inner, generator=g) * 0.5)
        self.register_buffer("dt_projs_weight", torch.randn(4, d_inner, rank, generator=g) * (0.1 if long else 0.5))
        self.register_buffer("dt_projs_bias", torch.randn(4, d_inner, generator=g) * 0.5 + (-7.0 if long else 0.0))
        self.register_buffer("A_logs", torch.rand(4 * d_inner, d_state, generator=g) * 3.0 - (1.0 if long else 0.0))
        self.register_buffer("Ds", torch.randn(4 * d_inner, generator=g))

    def forward(self, x):
        return kernels.cross_selective_scan(x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
                                            self.A_logs, self.Ds, backend=self.backend)


@pytest.mark.parametrize("d_state,memory", [(1, "long"), (4, "short"), (1, "short"), (3, "long")])
def test_onnx_core_lowering_matches_reference_at_any_size(d_state, memory, tmp_path):
    # Square and non-square maps both ways, a single row or column pair of lines, maps whose sides
    # share no factor, and a long one (4200 steps per route).
    module = _CoreOnly(5, d_state, 2, memory).eval()
    reference = _CoreOnly(5, d_state, 2, memory, backend="reference").eval()
    Dim = torch.export.Dim
    shapes = {"x": {0: Dim("batch", min=1, max=64), 2: Dim("height", min=2, max=4096),
                    3: Dim("width", min=2, max=4096)}}
    program = torch.export.export(module, (torch.randn(2, 5, 4, 6),), dynamic_shapes=shapes)
    path = tmp_path / "core.onnx"
    onnx.save_model(onnx_model_proto(program, output_names=None), str(path))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, height, width in [(1, 2, 2), (3, 7, 3), (2, 3, 7), (1, 2, 13), (2, 13, 2), (1, 11, 17), (1, 60, 70)]:
        x = torch.randn(batch, 5, height, width, generator=torch.Generator().manual_seed(height * width))
        with torch.no_grad():
            expected = reference(x)
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        err = float(np.abs(out - expected.numpy()).max())
        assert err <= 1e-4 * max(1.0, float(expected.abs().max())), (height, width, err)


def test_onnx_graph_is_standard_and_the_scan_is_not_unrolled(tmp_path_factory):
    name = list(MODELS)[0]                  # the export of the parity test above
    model, clf, path = _exported(name, lambda: _build(_shrunk(name), 0), tmp_path_factory)
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert not proto.functions
    # Six ONNX Scans per SS2D core (per pair of routes: lines, carries across lines, lines again),
    # whatever the map size: nothing is unrolled.
    assert sum(n.op_type == "Scan" for n in proto.graph.node) == 6 * sum(model.config.depths)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 3 and all(d.dim_param for d in (dims[0], dims[2], dims[3]))


def test_onnx_graph_size_does_not_depend_on_the_image_size():
    # Fixed-size exports (cheap to trace) at two sizes give graphs of about one size.
    model = _build(_shrunk("vmamba-tiny").replace(depths=(1, 1), dims=(8, 16)), 6)
    counts = [len(onnx_model_proto(export_program(model, dynamic=False, resolution=size, batch=1)).graph.node)
              for size in (64, (128, 96))]
    # Equal up to the constant folding of shape arithmetic, which can differ between sizes;
    # an unrolled scan would add nodes in proportion to the sequence length (4x here).
    assert abs(counts[0] - counts[1]) <= 0.05 * counts[0] and 20 < counts[0] < 5000


def test_missing_onnxruntime_names_the_extra(monkeypatch, cli_export, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match=r'pip install "vmamba\[export\]"') as info:
        _require("onnxruntime")
    assert "\n" not in str(info.value) and isinstance(info.value, VMambaError)
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(image)
    result = runner.invoke(app, ["predict", str(image), "--weights", str(cli_export["onnx"])])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        'error: onnxruntime is not installed: pip install "vmamba[export]"']


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

def test_pt2_round_trip_other_batch_and_size(cli_export, tmp_path):
    out = tmp_path / "m.pt2"
    result = runner.invoke(app, ["export", "--weights", str(cli_export["weights"]), "--format", "pt2", "--out",
                                 str(out), "--resolution", "64"])
    assert result.exit_code == 0, result.output
    program = torch.export.load(str(out))
    # The program runs the model's own core operator (kernel chosen where it runs).
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "vmamba.cross_selective_scan.default" in targets
    for shape in [(3, 3, 96, 64), (1, 3, 64, 128)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), cli_export["model"](x), atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# CLI export, and ONNX files in predict / eval / profile
# ------------------------------------------------------------------------------------------------

NAMES = [f"k{i}" for i in range(10)]


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """`vmamba export` of saved weights (a shrunk vmamba-tiny-s2l5 with 10 named classes)."""
    root = tmp_path_factory.mktemp("cli")
    model = _build(_shrunk("vmamba-tiny-s2l5", num_classes=10), 4)
    weights = save_model(root / "w.safetensors", model, name="vmamba-tiny-s2l5", class_names=NAMES)
    out = root / "out" / "m.onnx"
    result = runner.invoke(app, ["export", "--weights", str(weights), "--format", "onnx", "--out", str(out),
                                 "--resolution", "64"])
    return {"model": model, "weights": weights, "onnx": out, "result": result}


def test_cli_export_onnx_from_saved_weights(cli_export):
    result, out, model = cli_export["result"], cli_export["onnx"], cli_export["model"]
    assert result.exit_code == 0, result.output
    clf = OnnxClassifier(out)
    assert clf.class_names == NAMES and clf.name == "vmamba-tiny-s2l5" and clf.num_classes == 10
    # The weights' preset, at the export's example size.
    assert clf.preprocess == Preprocess(input_size=64)
    assert json.loads(clf.metadata["config"])["dims"] == list(model.config.dims)
    assert 100 < graph_node_count(out) < 5000
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 3 and all(d.dim_param for d in (dims[0], dims[2], dims[3]))
    for i, shape in enumerate(DYNAMIC_SHAPES + [(2, 3, 128, 160)]):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            ref = model(x).numpy()
        assert float(np.abs(clf(x) - ref).max()) <= TOL, shape
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


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Ten class folders named like the model's classes, two small images each."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in NAMES:
        (root / name).mkdir()
        for j in range(2):
            pixels = rng.integers(0, 256, (48 + 8 * j, 56, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{j}.png")
    return root


def _no_torch_model(monkeypatch):
    """Fail if the PyTorch model is built (an ONNX file must run without it)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch model was built")

    monkeypatch.setattr("vmamba_cli.predict.load_model", refuse)
    monkeypatch.setattr("vmamba_cli.weights.load_model", refuse)
    monkeypatch.setattr(VSSM, "__init__", refuse)


def test_predict_with_an_onnx_file(cli_export, image_folder, monkeypatch):
    reference = predict([image_folder], weights=cli_export["weights"], topk=3, device="cpu", resolution=64,
                        workers=1)
    _no_torch_model(monkeypatch)
    report = predict([image_folder], weights=str(cli_export["onnx"]), topk=3, workers=1)
    assert report.device == "cpu" and report.model == "vmamba-tiny-s2l5" and report.resolution == 64
    assert not report.failures and len(report.predictions) == len(reference.predictions) == 20
    for got, ref in zip(report.predictions, reference.predictions):
        assert got.path == ref.path
        assert [s.label for s in got.top] == [s.label for s in ref.top]
        assert max(abs(a.probability - b.probability) for a, b in zip(got.top, ref.top)) <= TOL
    result = runner.invoke(app, ["predict", str(image_folder / "k3" / "0.png"), "--weights",
                                 str(cli_export["onnx"]), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["predictions"][0]["top"][0]["label"] in NAMES


def test_eval_with_an_onnx_file(cli_export, image_folder, monkeypatch):
    reference = evaluate(image_folder, weights=cli_export["weights"], resolution=64, device="cpu", workers=0,
                         predictions=True)
    _no_torch_model(monkeypatch)
    result = evaluate(image_folder, weights=str(cli_export["onnx"]), device="cpu", workers=0, predictions=True)
    assert result.class_mapping == "class-names" and result.resolution == 64
    assert (result.num_images, result.correct_top1, result.correct_top5) == (
        reference.num_images, reference.correct_top1, reference.correct_top5)
    for got, ref in zip(result.predictions, reference.predictions):
        assert got.topk == ref.topk
    cli = runner.invoke(app, ["eval", str(image_folder), "--weights", str(cli_export["onnx"]), "--workers", "0",
                              "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["num_images"] == 20


@pytest.fixture
def small_registered(monkeypatch):
    """A registered model name for the shrunk s2l5 configuration (profile builds models by name)."""
    import vmamba_cli.model as model_module

    config = _shrunk("vmamba-tiny-s2l5", num_classes=10)
    spec = model_module.ModelSpec("vmamba-export-test", config, "-", "-", "export_test.pth", "#", 0.0, None, 0, 0)
    monkeypatch.setitem(model_module.MODELS, spec.name, spec)
    monkeypatch.setitem(model_module._ALIASES, spec.name, spec.name)
    return spec


def test_profile_times_onnxruntime_beside_eager(cli_export, small_registered, monkeypatch):
    # The export itself is covered above; here it copies the already exported file of the same
    # configuration (other weights: only the timing is under test), recording what it was given.
    exported_models = []

    def fake_export(model, path, **kwargs):
        exported_models.append(model)
        return shutil.copyfile(cli_export["onnx"], path)

    monkeypatch.setattr("vmamba_cli.profile.export_onnx", fake_export)
    rows = profile([small_registered.name], [64, 96], runtimes=["onnxruntime"], device="cpu", warmup=0, iters=1,
                   scan_bandwidth=False)
    assert [(r.get("runtime"), r["resolution"]) for r in rows] == [
        (None, 64), ("onnxruntime", 64), (None, 96), ("onnxruntime", 96)]
    assert len(exported_models) == 1 and isinstance(exported_models[0], VSSM)     # exported once per model
    for row in rows:
        assert row["status"] == "ok" and row["images_per_s"] > 0, row
    assert rows[1]["vs"]["reference"] == small_registered.name and rows[1]["vs"]["images_per_s"] > 0
    with pytest.raises(ValueError, match="unknown runtime"):
        profile([small_registered.name], [64], runtimes=["tensorrt"], scan_bandwidth=False)
    result = runner.invoke(app, ["profile", "-m", small_registered.name, "-r", "64", "--runtime", "torch",
                                 "onnxruntime", "--device", "cpu", "--warmup", "0", "--iters", "1",
                                 "--no-scan-bandwidth", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [r.get("runtime") for r in document["rows"]] == [None, "onnxruntime"]
    assert "--runtime torch onnxruntime" in document["command"]
