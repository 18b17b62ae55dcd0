"""Export a VMamba classifier: ONNX (standard operators only) and torch.export's ExportedProgram (.pt2).

Both paths trace the model with the "chunked" scan backend (``vmamba_cli.kernels.chunked``), whose
scan is one registered operator. ``export_pt2`` keeps that operator in the program (loading the
file needs ``vmamba_cli`` imported, which registers it). ``export_onnx`` lowers it to the chunked
closed form in plain ONNX operators (``_chunked_scan_onnx``): chunk sums, masked cumulative sums,
Exp, MatMul, with every size taken from the input shapes at run time, so one graph serves every
batch and image size and its node count does not depend on them. Nothing in a custom domain is
emitted: stock onnxruntime (or any ONNX runtime) runs the file.

The exporter is ``torch.onnx.export(..., dynamo=True)`` on the ExportedProgram (the TorchScript
exporter would trace the composite scan with the sizes of the example baked into its reshapes).

The ONNX file carries, in ``metadata_props``: ``vmamba.model``, ``vmamba.class_names`` (JSON list),
``vmamba.preprocess`` (JSON: resolution, crop_pct, interpolation, mean, std; docs/design.md §10),
``vmamba.config`` (the VMambaConfig as JSON) and ``vmamba.opset``. ``OnnxClassifier`` reads them back
and runs the file with onnxruntime, without building the PyTorch model.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vmamba_cli.data import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD

DEFAULT_OPSET = 18
EXPORT_BACKEND = "chunked"
INSTALL_HINT = 'pip install "vmamba[export]"'
# Height and width of a dynamic export are multiples of this: the stem divides by 4 and three
# downsamplings by 2 each (docs/design.md §3.2, §3.8).
SIZE_MULTIPLE = 32
_MAX_UNITS = 1024                   # dynamic sizes up to 32 * 1024 pixels a side
_META_PREFIX = "vmamba."


class ExportError(RuntimeError):
    """An export or an exported file that cannot be used; the message is one line."""


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: {INSTALL_HINT}") from None


# ------------------------------------------------------------------------------------------------
# Preprocessing preset and metadata
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreprocessPreset:
    """What `vmamba predict` does to an image before the model (docs/design.md §10)."""

    resolution: int = 224
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessPreset":
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _metadata(model, *, name: str, class_names: Sequence[str] | None, preprocess: PreprocessPreset,
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


def _export_copy(model):
    """A CPU float32 eval copy of ``model`` using the exportable scan (the caller's model is untouched)."""
    net = copy.deepcopy(model).to("cpu", torch.float32).eval()
    net.set_scan_backend(EXPORT_BACKEND)
    return net


def export_program(model, *, dynamic: bool = True, resolution: int | tuple[int, int] = 224, batch: int = 2):
    """torch.export.ExportedProgram of the classifier, dynamic in batch, height and width by default.

    Dynamic heights and widths are multiples of 32 from 64 up (non-square allowed). The example input is
    ``batch`` x 3 x ``resolution``; with ``dynamic`` the batch of the example must be at least 2 (a
    size-1 example would be specialised by the tracer).
    """
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if dynamic and (height % SIZE_MULTIPLE or width % SIZE_MULTIPLE):
        raise ValueError(f"a dynamic export needs a resolution that is a multiple of {SIZE_MULTIPLE}, "
                         f"got {height}x{width}")
    net = _export_copy(model)
    example = torch.randn(max(batch, 2) if dynamic else batch, net.config.in_chans, height, width)
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


def _atomic(path: str | os.PathLike, write) -> Path:
    from vmamba_cli.weights.loading import atomic_write

    return atomic_write(path, write)


def export_pt2(model, path: str | os.PathLike, *, dynamic: bool = True, resolution: int | tuple[int, int] = 224,
               batch: int = 2) -> Path:
    """Write the ExportedProgram with ``torch.export.save`` (atomically)."""
    program = export_program(model, dynamic=dynamic, resolution=resolution, batch=batch)
    return _atomic(path, lambda tmp: torch.export.save(program, tmp))


# ------------------------------------------------------------------------------------------------
# ONNX lowering of the chunked scan
# ------------------------------------------------------------------------------------------------

def _chunked_scan_onnx(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus: bool = False,
                       chunk: int = 8):
    """vmamba::chunked_selective_scan in standard ONNX operators (opset >= 18).

    The same closed form as ``kernels.chunked.selective_scan_chunked``: LEVELS - 1 chunked levels,
    then all pairs (CHUNK = 8, LEVELS = 4). Sizes (sequence length, chunk counts, padding) are computed from Shape at run
    time, so no size of the example is baked in.
    """
    from onnxscript import opset18 as op

    from vmamba_cli.kernels.chunked import LEVELS

    def i64(*values):
        return op.Constant(value=_onnx_tensor(np.array(values, dtype=np.int64)))

    def f32(value):
        return op.Constant(value=_onnx_tensor(np.array(value, dtype=np.float32)))

    zero, minus_inf = f32(0.0), f32(float("-inf"))

    def all_pairs(a, x):
        # a, x: rank 5 (..., T). [t, s] = a_{s+1} + ... + a_t for s <= t, from a masked cumsum.
        steps = op.Shape(a, start=-1)
        idx = op.Range(i64(0), op.Squeeze(steps, i64(0)), i64(1))
        rows, cols = op.Unsqueeze(idx, i64(1)), op.Unsqueeze(idx, i64(0))
        strictly_lower = op.Cast(op.Greater(rows, cols), to=1)                   # float 0/1
        upper_bias = op.Where(op.GreaterOrEqual(rows, cols), zero, minus_inf)   # (T, T): 0 / -inf
        sums = op.CumSum(op.Mul(op.Unsqueeze(a, i64(-1)), strictly_lower), i64(-2))
        decay = op.Exp(op.Add(sums, upper_bias))
        return op.Squeeze(op.MatMul(decay, op.Unsqueeze(x, i64(-1))), i64(-1))

    def recurrence(a, x, levels):
        # a, x: rank 4 (B, KD, N, L') -> h of the same shape.
        if levels <= 1:
            return all_pairs(a, x)
        length = op.Shape(a, start=3, end=4)
        pad = op.Mod(op.Sub(i64(chunk), op.Mod(length, i64(chunk))), i64(chunk))
        pads = op.Concat(i64(0, 0, 0, 0, 0, 0, 0), pad, axis=0)
        chunked_shape = op.Concat(op.Shape(a, start=0, end=3), i64(-1, chunk), axis=0)
        a_c = op.Reshape(op.Pad(a, pads, zero), chunked_shape)       # (B, KD, N, M, T)
        x_c = op.Reshape(op.Pad(x, pads, zero), chunked_shape)
        local = all_pairs(a_c, x_c)
        ends = op.Squeeze(op.Slice(local, i64(-1), i64(2**62), i64(-1)), i64(-1))   # (B, KD, N, M)
        carried = recurrence(op.ReduceSum(a_c, i64(-1), keepdims=0), ends, levels - 1)
        incoming = op.Slice(op.Pad(carried, i64(0, 0, 0, 1, 0, 0, 0, 0), zero), i64(0), i64(-1), i64(-1))
        h = op.Add(local, op.Mul(op.Exp(op.CumSum(a_c, i64(-1))), op.Unsqueeze(incoming, i64(-1))))
        flat = op.Reshape(h, op.Concat(op.Shape(a, start=0, end=3), i64(-1), axis=0))
        return op.Slice(flat, i64(0), length, i64(-1))

    dt = delta
    if delta_bias is not None:
        dt = op.Add(dt, op.Unsqueeze(delta_bias, i64(-1)))
    if delta_softplus:
        dt = op.Softplus(dt)
    a = op.Mul(op.Unsqueeze(dt, i64(2)), op.Unsqueeze(A, i64(0, 3)))           # (B, KD, N, L)
    # Channels of a group share its B and C: view KD as (K, D/K) and broadcast.
    grouped = op.Concat(op.Shape(u, start=0, end=1), op.Shape(B, start=1, end=2), i64(-1, 1),
                        op.Shape(u, start=2, end=3), axis=0)
    drive = op.Mul(op.Reshape(op.Mul(dt, u), grouped), op.Unsqueeze(B, i64(2)))   # (B, K, D/K, N, L)
    per_channel = op.Concat(op.Shape(u, start=0, end=2), op.Shape(B, start=2, end=3),
                            op.Shape(u, start=2, end=3), axis=0)
    h = recurrence(a, op.Reshape(drive, per_channel), LEVELS)
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

def default_preprocess(resolution: int = 224) -> PreprocessPreset:
    return PreprocessPreset(resolution=resolution)


def export_onnx(model, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, dynamic: bool = True,
                resolution: int | tuple[int, int] = 224, batch: int = 2, name: str = "custom",
                class_names: Sequence[str] | None = None, preprocess: PreprocessPreset | None = None) -> Path:
    """Write ``model`` as an ONNX file of standard operators (atomically) and return its path.

    Input ``x`` (batch, 3, height, width) float32 -> output ``logits`` (batch, classes). With
    ``dynamic`` batch, height and width are free (heights and widths multiples of 32, at least 64).
    """
    onnx = _require("onnx")
    _require("onnxscript")
    if opset < 18:
        raise ValueError(f"opset {opset} is too old: the scan lowering needs opset 18 or newer")
    program = export_program(model, dynamic=dynamic, resolution=resolution, batch=batch)
    table = {torch.ops.vmamba.chunked_selective_scan.default: _chunked_scan_onnx}
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, custom_translation_table=table,
                                     input_names=["x"], output_names=["logits"], verbose=False,
                                     optimize=True)
    proto = onnx_program.model_proto
    custom = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise ExportError(f"the exported graph uses non-standard operator domains {custom}")
    height = resolution if isinstance(resolution, int) else resolution[0]
    meta = _metadata(model, name=name, class_names=class_names,
                     preprocess=preprocess or default_preprocess(height), opset=opset)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return _atomic(path, lambda tmp: onnx.save_model(proto, tmp))


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
        names = json.loads(meta["class_names"]) if "class_names" in meta else None
        self.class_names = list(names) if isinstance(names, list) else None
        self.preprocess = (PreprocessPreset.from_dict(json.loads(meta["preprocess"])) if "preprocess" in meta
                           else PreprocessPreset())
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


__all__ = ["export_onnx", "export_pt2", "export_program", "OnnxClassifier", "PreprocessPreset", "ExportError",
           "graph_node_count", "DEFAULT_OPSET", "SIZE_MULTIPLE", "INSTALL_HINT"]
