"""Export a VMamba classifier: ONNX (standard operators only) and torch.export's ExportedProgram (.pt2).

Both paths trace the model with ``torch.export``; each SS2D core is then one node of the traced
program, the registered operator ``vmamba::cross_selective_scan`` with backend "auto".
``export_pt2`` saves that program: the operator picks its kernel when the program runs (the native
kernel on CPU, Triton on CUDA), so it runs at the eager model's speed; loading the file needs
``vmamba_cli`` imported, which registers the operator. ``export_onnx`` translates the program with
the core operator lowered to plain ONNX operators (``vmamba_cli.onnx_lowering``, docs/design.md
§5.4): the two pairs of scan routes (rows, columns) each run as three ONNX ``Scan``s over a
step-major copy of the map, one line of the map per segment, with the elementwise work inside the
Scan bodies and the backward routes read from the other end instead of flipped.

Every size but the parameters' is taken from the input shapes at run time, so one graph serves
every batch and image size and its node count does not depend on them. Nothing in a custom domain
is emitted: stock onnxruntime (or any ONNX runtime) runs the file.

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

from vmamba_cli.errors import ExportError
from vmamba_cli.model import VSSM, Preprocess, VMambaConfig
from vmamba_cli.onnx_lowering import cross_selective_scan_onnx
from vmamba_cli.weights import LoadedModel, atomic_write

DEFAULT_OPSET = 18
INSTALL_HINT = 'pip install "vmamba[export]"'
# Height and width of a dynamic export are multiples of this: the stem divides by 4 and three
# downsamplings by 2 each (docs/design.md §3.2, §3.8).
SIZE_MULTIPLE = 32
_MAX_UNITS = 1024                   # dynamic sizes up to 32 * 1024 pixels a side
_META_PREFIX = "vmamba."


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

def _export_copy(model):
    """A CPU float32 eval copy of ``model`` (a VSSM, or a module holding VSSMs) whose SS2D cores call
    the registered operator with backend "auto" (an inline backend such as "reference" would be
    traced op by op); the caller's model is untouched."""
    net = copy.deepcopy(model).to("cpu", torch.float32).eval()
    for module in net.modules():
        if isinstance(module, VSSM):
            module.set_scan_backend("auto")
    return net


def export_program(model, *, dynamic: bool = True, resolution: int | tuple[int, int] = 224, batch: int = 2):
    """torch.export.ExportedProgram of the classifier, dynamic in batch, height and width by default.

    Dynamic heights and widths are multiples of 32 from 64 up (non-square allowed). The example input is
    ``batch`` x 3 x ``resolution``; with ``dynamic`` the batch of the example must be at least 2 (a
    size-1 example would be specialised by the tracer). Each SS2D core is one call of
    ``vmamba::cross_selective_scan`` with backend "auto".
    """
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if dynamic and (height % SIZE_MULTIPLE or width % SIZE_MULTIPLE):
        raise ValueError(f"a dynamic export needs a resolution that is a multiple of {SIZE_MULTIPLE}, "
                         f"got {height}x{width}")
    net = _export_copy(model)
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
    return program


def export_pt2(model, path: str | os.PathLike, *, dynamic: bool = True, resolution: int | tuple[int, int] = 224,
               batch: int = 2) -> Path:
    """Write the ExportedProgram with ``torch.export.save`` (atomically).

    The program calls the SS2D core operator with backend "auto" (``export_program``), so a loaded
    program runs the same kernels as the eager model on the device it is moved to.
    """
    program = export_program(model, dynamic=dynamic, resolution=resolution, batch=batch)
    return save_pt2(program, path)


def save_pt2(program, path: str | os.PathLike) -> Path:
    """Write an ExportedProgram from ``export_program`` with ``torch.export.save`` (atomically)."""
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp))


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
    table = {torch.ops.vmamba.cross_selective_scan.default: cross_selective_scan_onnx}
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
