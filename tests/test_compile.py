"""torch.compile and torch.export: the forward is one graph with the registered operators inside,
and compiled / exported models give the eager numbers.

Compiling on a small CPU is slow (the inductor writes and builds C++ per kernel), so most checks
compile with AOTAutograd and no code generation (``_recording_backend``): that is the same graph
capture, fake-tensor tracing and autograd as the inductor gets, recorded for inspection. One small
model goes through the inductor itself; its cache (``TORCHINDUCTOR_CACHE_DIR``) makes reruns fast.
"""


import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from conftest import load_golden
from vmamba_cli.model import VSSM, get_model_spec, list_models

CORE = "vmamba.cross_selective_scan"
CORE_BACKWARD = "vmamba.cross_selective_scan_backward"


def _small(name):
    """A narrow one-block-per-stage model of ``name``'s family, for the slower checks."""
    return VSSM(get_model_spec(name).config.replace(
        dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0))


def _one_block_per_stage(name):
    """The released config with one block per stage: its widths, state size, ratios and layout
    flags are all kept (a stage repeats one block, so the depth only changes how long tracing takes)."""
    return VSSM(get_model_spec(name).config.replace(depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0))


def _targets(graph) -> list[str]:
    return [str(node.target) for node in graph.nodes if node.op == "call_function"]


def _calls(graph, op) -> int:
    return sum(target.startswith(op + ".") or target == op for target in _targets(graph))


class _Recorder:
    """A torch.compile backend: AOTAutograd with the forward/backward graphs recorded and run as
    they are (no code generation)."""

    def __init__(self):
        self.dynamo, self.forward, self.backward = [], [], []

        def keep(store):
            def compiler(gm, example_inputs):
                store.append(gm.graph)
                return make_boxed_func(gm.forward)
            return compiler

        self._aot = aot_autograd(fw_compiler=keep(self.forward), bw_compiler=keep(self.backward))

    def __call__(self, gm, example_inputs):
        self.dynamo.append(gm.graph)
        return self._aot(gm, example_inputs)


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# One graph, no breaks
# ------------------------------------------------------------------------------------------------

def _released(name):
    """The released config; for the small and base sizes with fewer blocks per stage (a stage
    repeats one block, so the count does not change what is traced, only how long it takes)."""
    config = get_model_spec(name).config
    return config if "tiny" in name else config.replace(depths=(1, 1, 2, 1))


@pytest.mark.parametrize("name", list_models())
def test_released_config_traces_as_one_graph(name):
    config = _released(name)
    model = VSSM(config).eval()
    explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 64, 64))
    assert explanation.graph_break_count == 0, [r.reason.splitlines()[0] for r in explanation.break_reasons]
    assert explanation.graph_count == 1
    assert sum(_calls(g.graph, CORE) for g in explanation.graphs) == sum(config.depths)


# ------------------------------------------------------------------------------------------------
# Compiled forward and backward, every released config
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list_models())
def compiled_config(request):
    # Each model is a new `self` to guard on; a reset keeps the nine within dynamo's recompile limit.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _one_block_per_stage(request.param)
    recorder = _Recorder()
    return model, torch.compile(model, backend=recorder, fullgraph=True), recorder


def test_compiled_forward_matches_eager_and_runs_the_operator(compiled_config):
    model, compiled, recorder = compiled_config
    model.eval()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        actual = compiled(x)
    assert (actual - expected).abs().max().item() <= 1e-5
    blocks = sum(model.config.depths)
    assert _calls(recorder.dynamo[-1], CORE) == blocks
    # The operator stays one node after AOTAutograd (no composed scan in its place).
    assert _calls(recorder.forward[-1], CORE) == blocks
    assert not any("selective_scan_flops" in t for t in _targets(recorder.forward[-1]))


def test_compiled_training_step_matches_eager_gradients(compiled_config):
    model, compiled, recorder = compiled_config
    model.train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    grads = []
    outputs = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        out = fn(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert (outputs[1] - outputs[0]).abs().max().item() <= 1e-5
    for name, expected in grads[0].items():
        # Relative to the tensor's largest entry: the compiled graph sums in another order, which moves
        # entries near zero by more than an elementwise rtol allows (e.g. 5e-6 on a head gradient of 2.6).
        error = (grads[1][name] - expected).abs().max().item()
        assert error <= 2e-5 * expected.abs().max().item() + 1e-6, (name, error)
    assert _calls(recorder.backward[-1], CORE_BACKWARD) == sum(model.config.depths)


# ------------------------------------------------------------------------------------------------
# The inductor itself, and the golden fixture
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inductor_model():
    torch.manual_seed(0)
    model = VSSM(get_model_spec("vmamba-tiny").config.replace(
        dims=(16, 32), depths=(1, 1), num_classes=10, drop_path_rate=0.0))
    return model, torch.compile(model, fullgraph=True)


def test_inductor_forward_calls_the_operator(inductor_model):
    from torch._inductor.utils import run_and_get_code

    model, compiled = inductor_model
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
        actual, code = run_and_get_code(compiled, x)
    assert (actual - expected).abs().max().item() <= 1e-5
    assert "torch.ops.vmamba.cross_selective_scan.default" in "\n".join(code)


def test_golden_fixture_through_compile(fixtures_dir):
    model, tensors = load_golden(fixtures_dir)
    recorder = _Recorder()
    with torch.no_grad():
        logits = torch.compile(model, backend=recorder, fullgraph=True)(tensors["input"])
    assert (logits - tensors["logits"]).abs().max().item() <= 1e-5
    assert _calls(recorder.forward[-1], CORE) == sum(model.config.depths)


# ------------------------------------------------------------------------------------------------
# torch.export with free batch, height and width
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_models())
def test_export_with_dynamic_batch_height_and_width(name):
    torch.manual_seed(0)
    model = _one_block_per_stage(name).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 64, 96),), dynamic_shapes=model.export_dynamic_shapes())
    assert _calls(program.graph, CORE) == sum(model.config.depths)
    exported = program.module()
    for shape in [(1, 3, 64, 128), (3, 3, 160, 64)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert (exported(x) - model(x)).abs().max().item() <= 1e-5, shape


# ------------------------------------------------------------------------------------------------
# `vmamba train --compile` and `vmamba profile --compile`
# ------------------------------------------------------------------------------------------------

def test_train_compile_saves_loadable_weights_without_the_compile_prefix(tmp_path):
    from vmamba_cli.train import load_config, train
    from vmamba_cli.weights import load_model

    config = load_config("digits", {
        "model_config": {"dims": [16, 32, 64], "depths": [1, 1, 1], "drop_path_rate": 0.0},
        "image_size": 16, "batch_size": 32, "threads": 1, "workers": 0, "val_fraction": 0.1, "epochs": 1,
        "subset": 64, "ema": False, "compile": True, "output": str(tmp_path / "run")})
    summary = train(config, progress=False)
    assert summary["status"] == "completed"
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "last.safetensors"))
    assert saved and not any("_orig_mod" in key for key in saved)
    model = load_model(weights=tmp_path / "run" / "last.safetensors").model
    assert all(torch.equal(model.state_dict()[key], value) for key, value in saved.items())


def test_profile_compile_adds_a_compiled_row_measured_through_the_compiler():
    from vmamba_cli.profile import MeasureTask, ProfileOptions, measure, profile

    seen = []

    def runner(task):
        seen.append((task.mode, type(task.model).__name__, task.options.warmup))
        return {"latency_ms": 1.0, "images_per_s": 1.0, "peak_memory_mb": 1.0, "memory_method": "fake"}

    rows = profile(["vmamba-tiny"], [64], runner=runner, scan_bandwidth=False, compile=True, warmup=0)
    assert [r.get("compiled", False) for r in rows] == [False, True]
    assert rows[1]["status"] == "ok" and rows[1]["flops"] == rows[0]["flops"]
    # The compiled row's first warm-up call is the compile.
    assert seen == [("inference", "VSSM", 0), ("inference", "OptimizedModule", 1)]

    # The real measurement (inference mode) runs a compiled model.
    model = _small("vmamba-tiny-s1l8").eval()
    recorder = _Recorder()
    task = MeasureTask("small", torch.compile(model, backend=recorder, fullgraph=True), 64, 2, "inference",
                       ProfileOptions(device=torch.device("cpu"), warmup=1, iters=1))
    assert measure(task)["images_per_s"] > 0
    assert _calls(recorder.forward[-1], CORE) == sum(model.config.depths)
