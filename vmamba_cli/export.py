"""Export a VMamba classifier: ONNX (standard operators only) and torch.export's ExportedProgram (.pt2).

Both paths trace the model with ``torch.export``; the scan is a registered operator in the traced
program. ``export_pt2`` traces with the default scan backend: the program calls the SS2D core
operator ``vmamba::cross_selective_scan`` with backend "auto", resolved when it runs (the native
kernel on CPU, Triton on CUDA), so it runs at the eager model's speed; loading the file needs
``vmamba_cli`` imported, which registers the operator. ``export_onnx`` traces with the "chunked"
backend, whose scan is the one operator ``vmamba::chunked_selective_scan``, and lowers it to plain
ONNX operators (``_selective_scan_onnx``, docs/design.md §5.4): the step sizes (softplus), decays
``exp(dt*A)`` and drives ``dt*B*u`` are batched operators over the whole sequence; the recurrence
``h = decay * h + drive`` runs as three ONNX ``Scan``s over segments of about sqrt(L) steps (segments in parallel from zero, their end states carried across segments, segments again
from their true starting states); ``y = C h + D u`` is batched again.

Every size is taken from the input shapes at run time, so one graph serves every batch and image
size and its node count does not depend on them. Nothing in a custom domain is emitted: stock
onnxruntime (or any ONNX runtime) runs the file.

The exporter is ``torch.onnx.export(..., dynamo=True)`` on the ExportedProgram (the TorchScript
exporter would trace the composite scan with the sizes of the example baked into its reshapes).

The ONNX file carries, in ``metadata_props``: ``vmamba.model``, ``vmamba.class_names`` (JSON list),
``vmamba.preprocess`` (JSON of ``model.Preprocess``: input_size, crop_pct, interpolation, mean, std;
docs/design.md §10), ``vmamba.config`` (the VMambaConfig as JSON) and ``vmamba.opset``.
``OnnxClassifier`` reads them back and runs the file with onnxruntime, without building the PyTorch
model; ``load_onnx`` wraps it as a ``LoadedModel`` for `vmamba predict` / `vmamba eval`.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vmamba_cli.errors import VMambaError
from vmamba_cli.model import VSSM, Preprocess, VMambaConfig
from vmamba_cli.weights import LoadedModel, atomic_write

DEFAULT_OPSET = 18
ONNX_BACKEND = "chunked"            # the scan as one operator with a standard-ONNX lowering
PT2_BACKEND = "auto"                # the fused core operator, kernel chosen where the program runs
INSTALL_HINT = 'pip install "vmamba[export]"'
# Height and width of a dynamic export are multiples of this: the stem divides by 4 and three
# downsamplings by 2 each (docs/design.md §3.2, §3.8).
SIZE_MULTIPLE = 32
_MAX_UNITS = 1024                   # dynamic sizes up to 32 * 1024 pixels a side
_META_PREFIX = "vmamba."


class ExportError(VMambaError, RuntimeError):
    """An export or an exported file that cannot be used (or a missing optional package); one line."""


def _require(module: str):
    """Import an optional dependency of the ``export`` extra, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: {INSTALL_HINT}") from None


# ------------------------------------------------------------------------------------------------
# Metadata
# ------------------------------------------------------------------------------------------------

def _metadata(model, *, name: str, class_names: Sequence[str] | None, preprocess: Preprocess,
              opset: int | None) -> dict[str, str]:
    meta = {
        "model": name,
        "config": json.dumps(model.config.to_dict()),
        "preprocess": json.dumps(preprocess.to_dict()),
        "class_names": json.dumps(list(class_names) if class_names is not None else None),
    }
    if opset is not None:
        meta["opset"] = str(opset)
    return {_META_PREFIX + k: v for k, v in meta.items()}


# ------------------------------------------------------------------------------------------------
# Tracing
# ------------------------------------------------------------------------------------------------

def _strip_flop_markers(program) -> None:
    """Drop the FLOP-counter identities (vmamba_cli.flops) that tracing records around the scan."""
    marker = torch.ops.vmamba.selective_scan_flops.default
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is marker:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()


def _export_copy(model, scan_backend: str):
    """A CPU float32 eval copy of ``model`` (a VSSM, or a module holding VSSMs) whose scans use
    ``scan_backend``; the caller's model is untouched."""
    net = copy.deepcopy(model).to("cpu", torch.float32).eval()
    for module in net.modules():
        if isinstance(module, VSSM):
            module.set_scan_backend(scan_backend)
    return net


def export_program(model, *, dynamic: bool = True, resolution: int | tuple[int, int] = 224, batch: int = 2,
                   scan_backend: str = ONNX_BACKEND):
    """torch.export.ExportedProgram of the classifier, dynamic in batch, height and width by default.

    Dynamic heights and widths are multiples of 32 from 64 up (non-square allowed). The example input is
    ``batch`` x 3 x ``resolution``; with ``dynamic`` the batch of the example must be at least 2 (a
    size-1 example would be specialised by the tracer). ``scan_backend`` "chunked" (the default)
    records the scan as ``vmamba::chunked_selective_scan``, the operator the ONNX translation lowers;
    "auto" records the SS2D core operator ``vmamba::cross_selective_scan`` with backend "auto", which
    picks the kernel for the device where the program runs (native on CPU, Triton on CUDA).
    """
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if dynamic and (height % SIZE_MULTIPLE or width % SIZE_MULTIPLE):
        raise ValueError(f"a dynamic export needs a resolution that is a multiple of {SIZE_MULTIPLE}, "
                         f"got {height}x{width}")
    net = _export_copy(model, scan_backend)
    channels = getattr(getattr(net, "config", None), "in_chans", 3)
    example = torch.randn(max(batch, 2) if dynamic else batch, channels, height, width)
    shapes = None
    if dynamic:
        Dim = torch.export.Dim
        # From 64 pixels: at 32 the last stage is 1 pixel high, a size the tracer specialises on.
        units_h = Dim("height_units", min=2, max=_MAX_UNITS)
        units_w = Dim("width_units", min=2, max=_MAX_UNITS)
        shapes = {"x": {0: Dim("batch", min=1, max=4096), 2: SIZE_MULTIPLE * units_h, 3: SIZE_MULTIPLE * units_w}}
    with torch.no_grad():
        program = torch.export.export(net, (example,), dynamic_shapes=shapes)
    _strip_flop_markers(program)
    return program


def export_pt2(model, path: str | os.PathLike, *, dynamic: bool = True, resolution: int | tuple[int, int] = 224,
               batch: int = 2) -> Path:
    """Write the ExportedProgram with ``torch.export.save`` (atomically).

    The program calls the SS2D core operator with backend "auto" (``export_program``), so a loaded
    program runs the same kernels as the eager model on the device it is moved to.
    """
    program = export_program(model, dynamic=dynamic, resolution=resolution, batch=batch, scan_backend=PT2_BACKEND)
    return save_pt2(program, path)


def save_pt2(program, path: str | os.PathLike) -> Path:
    """Write an ExportedProgram from ``export_program`` with ``torch.export.save`` (atomically)."""
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp))


# ------------------------------------------------------------------------------------------------
# ONNX lowering of the scan operator
# ------------------------------------------------------------------------------------------------

def _step_body(emit: str):
    """Body of an ONNX Scan advancing the recurrence one step: state h, scan inputs decay and x.

    ``emit`` says what the Scan collects per step besides the final state: "after" (the state after
    the step), "before" (the state the step started from) or "none".
    """
    from onnxscript import ir
    from onnx import TensorProto, helper

    def value(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

    nodes = [helper.make_node("Mul", ["decay", "h"], ["kept"]), helper.make_node("Add", ["kept", "x"], ["h_next"])]
    outputs = [value("h_next")]
    if emit != "none":
        nodes.append(helper.make_node("Identity", ["h_next" if emit == "after" else "h"], ["h_out"]))
        outputs.append(value("h_out"))
    graph = helper.make_graph(nodes, f"recurrence_step_{emit}", [value("h"), value("decay"), value("x")], outputs)
    return ir.serde.deserialize_graph(graph)


def _scan_op(opset, collects: bool = True):
    """ONNX Scan with one state and one pair of scan inputs, as an onnxscript op (final state, and
    with ``collects`` the per-step outputs).

    Scan's outputs are one variadic list (final states, then scan outputs); the exporter's recorder
    gives a variadic list one output, so the op is described by a schema naming each output.
    """
    from onnx.defs import OpSchema
    from onnxscript.values import Op

    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    outputs = [P("h_last", "T"), P("h_all", "T")] if collects else [P("h_last", "T")]
    schema = OpSchema(
        "Scan", "", 16, inputs=[P("h0", "T"), P("decay", "T"), P("x", "T")],
        outputs=outputs, type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[A("body", OpSchema.AttrType.GRAPH), A("num_scan_inputs", OpSchema.AttrType.INT),
                    A("scan_input_axes", OpSchema.AttrType.INTS, required=False),
                    A("scan_output_axes", OpSchema.AttrType.INTS, required=False)])
    return Op(opset, "Scan", schema)


def _selective_scan_onnx(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus: bool = False, chunk: int = 8):
    """vmamba::chunked_selective_scan in standard ONNX operators (opset >= 18).

    ``chunk`` (the PyTorch closed form's chunk length) does not apply here. Every size (sequence
    length, segment length and count) is computed from Shape at run time, so no size of the
    example is baked in and the graph is the same for every image size.
    """
    from onnxscript import opset18 as op

    def i64(*values):
        return op.Constant(value=_onnx_tensor(np.array(values, dtype=np.int64)))

    def f32(value):
        return op.Constant(value=_onnx_tensor(np.array(value, dtype=np.float32)))

    def recurrence(a, x):
        # h_t = exp(a_t) h_{t-1} + x_t along the last axis of (B, KD, N, L), h_{-1} = 0.
        # The sequence is cut into M segments of S steps, S the largest divisor of L up to about
        # sqrt(L) (for an image's L = h*w at least min(h, w)), so (B, KD, N, M, S) is a view: nothing
        # is padded or sliced. Three Scans, each iteration working on a whole (B, KD, N, M) or
        # (B, KD, N) slice: (1) every segment from a zero state, keeping only its end state; (2) those
        # ends carried across the segments, giving each segment's true starting state; (3) every
        # segment again from its starting state, collecting the states.
        length = op.Shape(a, start=3, end=4)
        limit = op.Add(op.Cast(op.Floor(op.Sqrt(op.Cast(length, to=1))), to=7), i64(1))
        candidates = op.Range(i64(1), op.Squeeze(limit, i64(0)), i64(1))
        divisors = op.Where(op.Equal(op.Mod(length, candidates), i64(0)), candidates, i64(0))
        step = op.ReduceMax(divisors, keepdims=1)                                # S, shape (1,)
        count = op.Div(length, step)                                            # M = L / S
        lead = op.Shape(a, start=0, end=3)
        shape = op.Concat(lead, count, step, axis=0)
        # Step within the segment first, (S, B, KD, N, M): each Scan iteration reads one contiguous
        # slice (a Scan over another axis transposes its inputs and outputs itself, more slowly).
        decay = op.Transpose(op.Reshape(op.Exp(a), shape), perm=[4, 0, 1, 2, 3])
        drive = op.Transpose(op.Reshape(x, shape), perm=[4, 0, 1, 2, 3])
        zeros = op.ConstantOfShape(op.Concat(lead, count, axis=0))
        ends = _scan_op(op, collects=False)(zeros, decay, drive, body=_step_body("none"), num_scan_inputs=2)
        totals = op.ReduceProd(decay, i64(0), keepdims=0)                      # (B, KD, N, M)
        _, starts = _scan_op(op)(op.ConstantOfShape(lead), totals, ends, body=_step_body("before"),
                                 num_scan_inputs=2, scan_input_axes=[3, 3], scan_output_axes=[3])
        _, hs = _scan_op(op)(starts, decay, drive, body=_step_body("after"), num_scan_inputs=2)
        return op.Reshape(op.Transpose(hs, perm=[1, 2, 3, 4, 0]), op.Shape(a))

    dt = delta
    if delta_bias is not None:
        dt = op.Add(dt, op.Unsqueeze(delta_bias, i64(-1)))
    if delta_softplus:
        # softplus as PyTorch defines it (the input itself above 20) in five cheap elementwise passes:
        # log(1 + exp(min(x, 20))) >= x below 20 and rounds to 20 at it, so the Max picks x above 20.
        # onnxruntime's own Softplus is a slower scalar loop.
        dt = op.Max(dt, op.Log(op.Add(op.Exp(op.Min(dt, f32(20.0))), f32(1.0))))
    a = op.Mul(op.Unsqueeze(dt, i64(2)), op.Unsqueeze(A, i64(0, 3)))           # (B, KD, N, L)
    # Channels of a group share its B and C: view KD as (K, D/K) and broadcast.
    grouped = op.Concat(op.Shape(u, start=0, end=1), op.Shape(B, start=1, end=2), i64(-1, 1),
                        op.Shape(u, start=2, end=3), axis=0)
    drive = op.Mul(op.Reshape(op.Mul(dt, u), grouped), op.Unsqueeze(B, i64(2)))   # (B, K, D/K, N, L)
    per_channel = op.Concat(op.Shape(u, start=0, end=2), op.Shape(B, start=2, end=3),
                            op.Shape(u, start=2, end=3), axis=0)
    h = recurrence(a, op.Reshape(drive, per_channel))
    h_grouped = op.Reshape(h, op.Concat(op.Shape(B, start=0, end=2), i64(-1), op.Shape(B, start=2, end=4), axis=0))
    y = op.ReduceSum(op.Mul(h_grouped, op.Unsqueeze(C, i64(2))), i64(3), keepdims=0)
    y = op.Reshape(y, op.Shape(u))
    if D is not None:
        y = op.Add(y, op.Mul(op.Unsqueeze(D, i64(-1)), u))
    return y


def _onnx_tensor(array: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(array)


# ------------------------------------------------------------------------------------------------
# ONNX export
# ------------------------------------------------------------------------------------------------

def onnx_model_proto(program, *, opset: int = DEFAULT_OPSET, output_names: Sequence[str] | None = ("logits",)):
    """The ONNX ModelProto of an ExportedProgram from ``export_program`` (input ``x``), no metadata.

    ``output_names`` None leaves the exporter's names (a program of several outputs).
    """
    _require("onnx")
    _require("onnxscript")
    if opset < 18:
        raise ValueError(f"opset {opset} is too old: the scan lowering needs opset 18 or newer")
    table = {torch.ops.vmamba.chunked_selective_scan.default: _selective_scan_onnx}
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, custom_translation_table=table,
                                     input_names=["x"], output_names=list(output_names) if output_names else None,
                                     verbose=False, optimize=True)
    proto = onnx_program.model_proto
    custom = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise ExportError(f"the exported graph uses non-standard operator domains {custom}")
    return proto


def export_onnx(model, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, dynamic: bool = True,
                resolution: int | tuple[int, int] = 224, batch: int = 2, name: str = "custom",
                class_names: Sequence[str] | None = None, preprocess: Preprocess | None = None) -> Path:
    """Write ``model`` as an ONNX file of standard operators (atomically) and return its path.

    Input ``x`` (batch, 3, height, width) float32 -> output ``logits`` (batch, classes). With
    ``dynamic`` batch, height and width are free (heights and widths multiples of 32, at least 64).
    ``preprocess`` (recorded in the metadata) defaults to the default preset at the example's height.
    """
    onnx = _require("onnx")
    _require("onnxscript")
    if opset < 18:
        raise ValueError(f"opset {opset} is too old: the scan lowering needs opset 18 or newer")
    program = export_program(model, dynamic=dynamic, resolution=resolution, batch=batch)
    proto = onnx_model_proto(program, opset=opset)
    height = resolution if isinstance(resolution, int) else resolution[0]
    meta = _metadata(model, name=name, class_names=class_names,
                     preprocess=preprocess or Preprocess(input_size=height), opset=opset)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))


def graph_node_count(path: str | os.PathLike) -> int:
    """Nodes of an ONNX file's main graph (functions and subgraphs not expanded)."""
    onnx = _require("onnx")
    return len(onnx.load(str(path), load_external_data=False).graph.node)


# ------------------------------------------------------------------------------------------------
# onnxruntime inference
# ------------------------------------------------------------------------------------------------

class OnnxClassifier:
    """An exported classifier run by onnxruntime: ``clf(batch) -> logits`` (numpy float32).

    ``batch`` is a (N, 3, H, W) torch tensor or numpy array, already preprocessed as ``preprocess``
    says. ``class_names`` and ``preprocess`` come from the file's metadata.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such file")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types, one per failure kind
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"{self.path}: not a loadable ONNX model ({first[:200]})") from None
        raw = self.session.get_modelmeta().custom_metadata_map
        meta = {k[len(_META_PREFIX):]: v for k, v in raw.items() if k.startswith(_META_PREFIX)}
        self.metadata = meta
        self.name = meta.get("model", "custom")
        try:
            names = json.loads(meta["class_names"]) if "class_names" in meta else None
            self.preprocess = (Preprocess.from_dict(json.loads(meta["preprocess"])) if "preprocess" in meta
                               else Preprocess())
        except (ValueError, TypeError) as exc:     # json.JSONDecodeError is a ValueError too
            raise ExportError(f"{self.path}: bad vmamba metadata ({exc})") from None
        self.class_names = [str(n) for n in names] if isinstance(names, list) else None
        self.input_name = self.session.get_inputs()[0].name

    @property
    def num_classes(self) -> int | None:
        dim = self.session.get_outputs()[0].shape[-1]
        return dim if isinstance(dim, int) else (len(self.class_names) if self.class_names else None)

    def __call__(self, batch) -> np.ndarray:
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().to("cpu", torch.float32).numpy()
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run(None, {self.input_name: batch})[0]


class OnnxModule(torch.nn.Module):
    """An ``OnnxClassifier`` behind the ``nn.Module`` interface, so that the predict and eval loops run
    an ONNX file unchanged: float32 logits come back on the input's device. ``config`` is the
    VMambaConfig from the metadata (its ``num_classes`` sizes the head); no PyTorch model is built."""

    def __init__(self, classifier: OnnxClassifier):
        super().__init__()
        self.classifier = classifier
        raw = classifier.metadata.get("config")
        try:
            self.config = VMambaConfig.from_dict(json.loads(raw)) if raw else None
        except (ValueError, TypeError, KeyError) as exc:
            raise ExportError(f"{classifier.path}: bad vmamba.config metadata ({exc})") from None
        self.num_classes = classifier.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.classifier(x)).to(x.device)


def is_onnx_file(weights) -> bool:
    """Whether a ``--weights`` value names an ONNX file (by its suffix), to be run by onnxruntime."""
    return isinstance(weights, (str, os.PathLike)) and str(weights).lower().endswith(".onnx")


def load_onnx(path: str | os.PathLike, *, threads: int | None = None) -> LoadedModel:
    """An exported file as a ``LoadedModel`` (model: ``OnnxModule``; name, class names and preprocessing
    preset from the file's metadata), for the code paths that take one."""
    classifier = OnnxClassifier(path, threads=threads)
    return LoadedModel(model=OnnxModule(classifier), name=classifier.name, class_names=classifier.class_names,
                       source=str(path), metadata=dict(classifier.metadata), preprocess=classifier.preprocess)


__all__ = ["export_onnx", "export_pt2", "save_pt2", "export_program", "onnx_model_proto", "OnnxClassifier",
           "OnnxModule", "ExportError", "is_onnx_file", "load_onnx", "graph_node_count", "DEFAULT_OPSET",
           "SIZE_MULTIPLE", "INSTALL_HINT"]
