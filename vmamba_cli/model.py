"""VMamba (arXiv 2401.10166): the VSSM backbone, both released families, in one module.

* v0 ("Vanilla VMamba"): 4x4 patch stem, gated SS2D with d_state 16, no MLP, PatchMerging,
  activations kept channel-last (NHWC).
* v2 / v2v ("VMamba-T/S/B"): two 3x3 stride-2 convs as stem, SS2D without gate, d_state 1, an MLP
  after every mixer, 3x3 stride-2 conv downsampling, activations kept channel-first (NCHW).

State-dict keys and shapes are the official ones, so released checkpoints load with strict=True
(``vmamba_cli.weights`` reads the files; this module reads none). ``VMambaConfig`` holds the
architecture, ``Preprocess`` how images become inputs, ``MODELS`` the nine released variants with
their reported numbers.
"""

from __future__ import annotations

import dataclasses
import math
from importlib.resources import files as _package_files
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vmamba_cli.errors import UnknownModelError
from vmamba_cli.kernels import NUM_DIRECTIONS, cross_selective_scan, row_layer_norm
from vmamba_cli.kernels.flops import in_dispatch_mode

LN_EPS = 1e-5


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VMambaConfig:
    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (2, 2, 8, 2)
    num_classes: int = 1000
    in_chans: int = 3
    patch_size: int = 4
    d_state: int = 1
    ssm_ratio: float = 1.0
    dt_rank: int | str = "auto"         # "auto" = ceil(stage dim / 16)
    ssm_conv: int = 3                    # depthwise conv kernel inside SS2D (<= 1: none)
    ssm_conv_bias: bool = False
    gated: bool = False                  # z-branch multiplying the scan output (v0)
    mlp_ratio: float = 4.0               # 0: no MLP in the block (v0)
    drop_path_rate: float = 0.2
    ssm_drop_rate: float = 0.0
    mlp_drop_rate: float = 0.0
    channels_first: bool = True          # NCHW activations (official norm_layer "ln2d") or NHWC ("ln")
    stem: str = "v2"                     # "v1": patch conv; "v2": two 3x3 stride-2 convs
    downsample: str = "v3"               # "v1": PatchMerging; "v2": 2x2 conv; "v3": 3x3 stride-2 conv

    def __post_init__(self):
        if self.stem not in ("v1", "v2"):
            raise ValueError(f"stem must be 'v1' or 'v2', got {self.stem!r}")
        if self.downsample not in ("v1", "v2", "v3"):
            raise ValueError(f"downsample must be 'v1', 'v2' or 'v3', got {self.downsample!r}")
        if len(self.dims) != len(self.depths):
            raise ValueError(f"dims {self.dims} and depths {self.depths} differ in length")

    def replace(self, **changes) -> "VMambaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VMambaConfig":
        d = dict(d)
        for key in ("dims", "depths"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    # -- the official VSSM(**kwargs) keyword set ---------------------------------------------------
    @classmethod
    def from_official(cls, config: dict[str, Any]) -> "VMambaConfig":
        """Translate the official ``VSSM(**kwargs)`` keywords (as stored in checkpoints/fixtures)."""
        c = dict(config)
        dims = c.get("dims", 96)
        depths = tuple(c.get("depths", (2, 2, 9, 2)))
        dims = tuple(dims) if isinstance(dims, (list, tuple)) else tuple(int(dims) * 2**i for i in range(len(depths)))
        gated, legacy = _parse_forward_type(c.get("forward_type", "v2"))
        for key, allowed in (("ssm_act_layer", "silu"), ("mlp_act_layer", "gelu"), ("ssm_init", "v0")):
            if str(c.get(key, allowed)).lower() != allowed:
                raise ValueError(f"unsupported {key}={c[key]!r} (only {allowed!r} is implemented)")
        for key, allowed in (("gmlp", False), ("posembed", False), ("patch_norm", True)):
            if bool(c.get(key, allowed)) != allowed:
                raise ValueError(f"unsupported {key}={c[key]!r}")
        norm = str(c.get("norm_layer", "ln")).lower()
        if norm not in ("ln", "ln2d"):
            raise ValueError(f"unsupported norm_layer={norm!r} (ln or ln2d)")
        return cls(
            dims=dims, depths=depths,
            num_classes=int(c.get("num_classes", 1000)), in_chans=int(c.get("in_chans", 3)),
            patch_size=int(c.get("patch_size", 4)),
            d_state=int(c.get("ssm_d_state", 16)), ssm_ratio=float(c.get("ssm_ratio", 2.0)),
            dt_rank=c.get("ssm_dt_rank", "auto"),
            # The legacy v0 mixer always builds a 3x3 depthwise conv with bias.
            ssm_conv=3 if legacy else int(c.get("ssm_conv", 3)),
            ssm_conv_bias=True if legacy else bool(c.get("ssm_conv_bias", True)),
            gated=gated, mlp_ratio=float(c.get("mlp_ratio", 4.0)),
            drop_path_rate=float(c.get("drop_path_rate", 0.1)),
            ssm_drop_rate=float(c.get("ssm_drop_rate", 0.0)), mlp_drop_rate=float(c.get("mlp_drop_rate", 0.0)),
            channels_first=norm == "ln2d",
            stem=str(c.get("patchembed_version", "v2")), downsample=str(c.get("downsample_version", "v2")),
        )

    def to_official(self) -> dict[str, Any]:
        """The official ``VSSM(**kwargs)`` keyword set that builds the same network."""
        return {
            "patch_size": self.patch_size, "in_chans": self.in_chans, "num_classes": self.num_classes,
            "depths": list(self.depths), "dims": list(self.dims),
            "ssm_d_state": self.d_state, "ssm_ratio": self.ssm_ratio, "ssm_dt_rank": self.dt_rank,
            "ssm_act_layer": "silu", "ssm_conv": self.ssm_conv, "ssm_conv_bias": self.ssm_conv_bias,
            "ssm_drop_rate": self.ssm_drop_rate, "ssm_init": "v0",
            "forward_type": "v05" if self.gated else "v05_noz",
            "mlp_ratio": self.mlp_ratio, "mlp_act_layer": "gelu", "mlp_drop_rate": self.mlp_drop_rate,
            "gmlp": False, "drop_path_rate": self.drop_path_rate, "patch_norm": True,
            "norm_layer": "ln2d" if self.channels_first else "ln",
            "downsample_version": self.downsample, "patchembed_version": self.stem,
            "use_checkpoint": False, "posembed": False, "imgsize": 224,
        }


_EQUIVALENT_FORWARD_TYPES = ("v01", "v02", "v03", "v04", "v05", "v3")


def _parse_forward_type(forward_type: str) -> tuple[bool, bool]:
    """Official forward_type -> (gated, legacy_v0). Only numerically standard variants are accepted."""
    ft = str(forward_type)
    if ft in ("v0", "v0seq"):
        return True, True
    gated = True
    for suffix in ("_no32", "_noz"):  # order: tags are stripped from the end
        if ft.endswith(suffix):
            ft = ft[: -len(suffix)]
            gated = gated and suffix != "_noz"
    if ft not in _EQUIVALENT_FORWARD_TYPES:
        raise ValueError(
            f"unsupported forward_type={forward_type!r}: supported are v0 and "
            f"{'/'.join(_EQUIVALENT_FORWARD_TYPES)} with optional _noz"
        )
    return gated, False


# ------------------------------------------------------------------------------------------------
# Preprocessing preset
# ------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The released models were evaluated at 224 after resizing the short side to 256 (docs/design.md §10).
DEFAULT_CROP_PCT = 224 / 256
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input at evaluation, like timm's pretrained cfg.

    Resize the short side to ``resize_size`` (``input_size / crop_pct``) with ``interpolation``,
    center-crop ``input_size``, scale to [0, 1], normalise with ``mean`` / ``std``. Each registered
    model carries one; checkpoints written by ``vmamba_cli.weights.save_model`` record it, so predict,
    eval and erf use a trained model's own input size and crop without flags.
    """

    input_size: int = 224
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        if not isinstance(self.input_size, int) or isinstance(self.input_size, bool) or self.input_size < 1:
            raise ValueError(f"input size must be a positive integer, got {self.input_size!r}")
        if not 0.0 < float(self.crop_pct) <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean {self.mean} and std {self.std} must be non-empty and of one length")
        if any(float(s) <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def resize_size(self) -> int:
        """Short side before the center crop."""
        return int(self.input_size / self.crop_pct)

    def with_overrides(self, *, input_size: int | None = None, crop_pct: float | None = None) -> "Preprocess":
        """This preset with the values the user gave (None keeps the preset's)."""
        changes = {k: v for k, v in (("input_size", input_size), ("crop_pct", crop_pct)) if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        """Inverse of ``to_dict``; missing keys take the defaults, a bad value raises ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing preset must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {', '.join(unknown)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (the head of every released model).

    Shipped as a text file (the list torchvision carries in its weight metadata) so that reading it
    does not pay for importing torchvision.models.
    """
    return _package_files("vmamba_cli").joinpath("imagenet_classes.txt").read_text(encoding="utf-8").splitlines()


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis; on CUDA a Triton kernel for contiguous rows (the model's case).

    ``backend`` follows the model's scan backend (``VSSM.set_scan_backend``): "auto" / "triton" use
    the kernel where it applies, anything else plain ``F.layer_norm``.
    """

    backend = "auto"
    # Set on norms whose only reader is a linear layer: under CUDA autocast the kernel then writes
    # the autocast dtype that layer would cast its input to (same values, one cast less each way).
    autocast_output = False

    def _rows_kernel(self, x: torch.Tensor):
        # Under torch.compile / torch.export the compiler fuses F.layer_norm itself; eagerly, fake or
        # meta tensors (a dispatch mode) cannot run a Triton kernel.
        if (torch.compiler.is_compiling() or not x.is_cuda or not x.is_contiguous() or not self.elementwise_affine
                or self.bias is None or self.backend not in ("auto", "triton") or in_dispatch_mode()):
            return None
        return row_layer_norm(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._rows_kernel(x)
        if kernel is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        out_dtype = None
        if self.autocast_output and torch.is_autocast_enabled("cuda"):
            out_dtype = torch.get_autocast_dtype("cuda")
        return kernel(x.reshape(-1, x.shape[-1]), self.weight, self.bias, self.eps, out_dtype).view(x.shape)


class LayerNorm2d(LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor (rows when it is channels-last in memory)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Linear2d(nn.Linear):
    """A per-pixel linear layer on NCHW tensors (a 1x1 conv holding an (out, in) weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One GEMM over pixels on the channels-last view; the result is NCHW-shaped with
        # channels_last strides. (A 1x1 mkldnn conv reorders to its blocked format and back on
        # every call, which costs more than the product on CPU.)
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Conv-style (out, in, 1, 1) weights are the same parameters.
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dim() == 4:
            state_dict[key] = state_dict[key].flatten(1)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GELU(nn.GELU):
    """nn.GELU that runs NCHW maps stored channels-last on their contiguous NHWC view.

    PyTorch's CPU GELU is about 1.6x slower on a channels-last-strided NCHW tensor (what
    Linear2d and LayerNorm2d return) than on the same memory viewed as contiguous NHWC; SiLU and
    additions are not (measured in docs/kernels-cpu.md). Same values either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A compiler picks its own loop order; a layout test there would only add shape guards.
        if torch.compiler.is_compiling():
            return super().forward(x)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)

    def extra_repr(self):
        return str(self.dims)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


class _Layout:
    """Builds the layout-dependent pieces (norms, per-pixel linears, permutes) of a config."""

    def __init__(self, channels_first: bool):
        self.channels_first = channels_first

    def norm(self, dim: int) -> nn.Module:
        return LayerNorm2d(dim, eps=LN_EPS) if self.channels_first else LayerNorm(dim, eps=LN_EPS)

    def linear(self, d_in: int, d_out: int, bias: bool = True) -> nn.Module:
        return Linear2d(d_in, d_out, bias=bias) if self.channels_first else nn.Linear(d_in, d_out, bias=bias)

    def to_last(self) -> nn.Module:
        """NCHW -> the layout's activation format (identity when channel-first)."""
        return nn.Identity() if self.channels_first else Permute(0, 2, 3, 1)

    def to_first(self) -> nn.Module:
        return nn.Identity() if self.channels_first else Permute(0, 3, 1, 2)

    @property
    def channel_dim(self) -> int:
        return 1 if self.channels_first else -1


def _stem(cfg: VMambaConfig, layout: _Layout) -> nn.Sequential:
    c0 = cfg.dims[0]
    if cfg.stem == "v1":
        return nn.Sequential(
            nn.Conv2d(cfg.in_chans, c0, kernel_size=cfg.patch_size, stride=cfg.patch_size),
            layout.to_last(), layout.norm(c0),
        )
    stride = cfg.patch_size // 2
    return nn.Sequential(
        nn.Conv2d(cfg.in_chans, c0 // 2, kernel_size=3, stride=stride, padding=1),
        layout.to_last(), layout.norm(c0 // 2), layout.to_first(),
        GELU(),
        nn.Conv2d(c0 // 2, c0, kernel_size=3, stride=stride, padding=1),
        layout.to_last(), layout.norm(c0),
    )


class PatchMerging2D(nn.Module):
    """2x2 space-to-depth (phases (0,0), (1,0), (0,1), (1,1), first index along H), LN, linear 4C->2C."""

    def __init__(self, dim: int, out_dim: int, channels_first: bool):
        super().__init__()
        self.channels_first = channels_first
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=LN_EPS)

    def forward(self, x):
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        height, width = x.shape[1], x.shape[2]
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = self.reduction(self.norm(x))
        return x.permute(0, 3, 1, 2) if self.channels_first else x


def _downsample(cfg: VMambaConfig, layout: _Layout, dim: int, out_dim: int) -> nn.Module:
    if cfg.downsample == "v1":
        return PatchMerging2D(dim, out_dim, cfg.channels_first)
    kernel, padding = (3, 1) if cfg.downsample == "v3" else (2, 0)
    return nn.Sequential(
        layout.to_first(),
        nn.Conv2d(dim, out_dim, kernel_size=kernel, stride=2, padding=padding),
        layout.to_last(), layout.norm(out_dim),
    )


class SS2D(nn.Module):
    """2-D selective scan mixer: in_proj, depthwise conv, SiLU, four-direction scan, LN, out_proj."""

    def __init__(self, dim: int, cfg: VMambaConfig, layout: _Layout):
        super().__init__()
        d_inner = int(cfg.ssm_ratio * dim)
        rank = math.ceil(dim / 16) if cfg.dt_rank == "auto" else int(cfg.dt_rank)
        n = cfg.d_state
        self.d_inner, self.dt_rank, self.d_state, self.gated = d_inner, rank, n, cfg.gated
        self.layout = layout
        self.scan_backend = "auto"
        # Launch tuning for the Triton backend (kernels.triton.TritonTuning); None: its defaults.
        self.scan_tuning = None

        self.x_proj_weight = nn.Parameter(torch.empty(NUM_DIRECTIONS, rank + 2 * n, d_inner))
        self.A_logs = nn.Parameter(torch.empty(NUM_DIRECTIONS * d_inner, n))
        self.Ds = nn.Parameter(torch.empty(NUM_DIRECTIONS * d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(NUM_DIRECTIONS, d_inner, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(NUM_DIRECTIONS, d_inner))

        in_proj = layout.linear(dim, d_inner * (2 if cfg.gated else 1), bias=False)
        conv = None
        if cfg.ssm_conv > 1:
            conv = nn.Conv2d(d_inner, d_inner, cfg.ssm_conv, padding=(cfg.ssm_conv - 1) // 2,
                             groups=d_inner, bias=cfg.ssm_conv_bias)
        out_norm = layout.norm(d_inner)
        out_norm.autocast_output = not cfg.gated   # read by out_proj only (gated: first by y * silu(z))
        # Registration order follows the official classes so state_dict listings read the same.
        if cfg.gated:
            self.in_proj, self.conv2d, self.out_norm = in_proj, conv, out_norm
        else:
            self.out_norm, self.in_proj, self.conv2d = out_norm, in_proj, conv
        self.out_proj = layout.linear(d_inner, dim, bias=False)
        self.dropout = nn.Dropout(cfg.ssm_drop_rate) if cfg.ssm_drop_rate > 0 else nn.Identity()
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4):
        """Official "v0" init of the scan parameters (docs/design.md §4)."""
        d_inner, rank, n = self.d_inner, self.dt_rank, self.d_state
        bound = d_inner ** -0.5  # nn.Linear(d_inner, .) default init
        self.x_proj_weight.uniform_(-bound, bound)
        self.dt_projs_weight.uniform_(-rank ** -0.5, rank ** -0.5)
        dt = torch.exp(torch.rand(NUM_DIRECTIONS, d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_logs.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(NUM_DIRECTIONS * d_inner, 1))
        self.Ds.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdim = self.layout.channel_dim
        x = self.in_proj(x)
        if self.gated:
            x, z = x.chunk(2, dim=cdim)
        if not self.layout.channels_first:
            x = x.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            x = self.conv2d(x)
        x = F.silu(x)
        y = cross_selective_scan(x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
                                 self.A_logs, self.Ds, backend=self.scan_backend, tuning=self.scan_tuning)
        if not self.layout.channels_first:
            y = y.permute(0, 2, 3, 1)
        # The scan returns float32; a model converted to bf16 / fp16 as a whole (model.to(dtype))
        # has a norm of that dtype, and F.layer_norm refuses mixed dtypes.
        y = self.out_norm(y.to(self.out_norm.weight.dtype))
        if self.gated:
            y = y * F.silu(z)
        return self.dropout(self.out_proj(y.to(x.dtype)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, layout: _Layout, drop: float = 0.0):
        super().__init__()
        self.fc1 = layout.linear(dim, hidden)
        self.act = GELU()
        self.fc2 = layout.linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LN(x))), then x + DropPath(MLP(LN(x))) when the config has an MLP."""

    def __init__(self, dim: int, drop_path: float, cfg: VMambaConfig, layout: _Layout):
        super().__init__()
        self.norm = layout.norm(dim)
        self.norm.autocast_output = True             # read by SS2D.in_proj only
        self.op = SS2D(dim, cfg, layout)
        self.drop_path = DropPath(drop_path)
        self.has_mlp = cfg.mlp_ratio > 0
        if self.has_mlp:
            self.norm2 = layout.norm(dim)
            self.norm2.autocast_output = True        # read by mlp.fc1 only
            self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), layout, cfg.mlp_drop_rate)

    def forward(self, x):
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.has_mlp:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


# ------------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------------

class VSSM(nn.Module):
    """VMamba classifier; ``forward_features`` gives the per-stage maps for backbone use."""

    def __init__(self, config: VMambaConfig | None = None, **overrides):
        super().__init__()
        cfg = (config or VMambaConfig()).replace(**overrides)
        self.config = cfg
        layout = _Layout(cfg.channels_first)
        self._layout = layout
        self.num_features = cfg.dims[-1]
        self.patch_embed = _stem(cfg, layout)
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear over all blocks
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths)):
            start = sum(cfg.depths[:i])
            blocks = nn.Sequential(*[VSSBlock(dim, rates[start + j], cfg, layout) for j in range(depth)])
            last = i == len(cfg.dims) - 1
            downsample = nn.Identity() if last else _downsample(cfg, layout, dim, cfg.dims[i + 1])
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=downsample)))
        self.classifier = nn.Sequential(OrderedDict(
            norm=layout.norm(self.num_features),
            permute=layout.to_first(),
            avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            head=nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity(),
        ))
        self.init_weights()

    # -- init ---------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self):
        """Official init: trunc-normal(0.02) linears, unit LayerNorms, PyTorch-default convs (docs/design.md §4)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- knobs ---------------------------------------------------------------------------------
    def set_scan_backend(self, backend: str) -> "VSSM":
        """Choose the selective-scan backend ("auto", "torch", "reference", ...) for every block.

        The channel LayerNorms follow: their Triton kernel runs only under "auto" or "triton".
        """
        for m in self.modules():
            if isinstance(m, SS2D):
                m.scan_backend = backend
            elif isinstance(m, LayerNorm):
                m.backend = backend
        return self

    def set_scan_tuning(self, tuning) -> "VSSM":
        """Pass ``tuning`` (a ``kernels.triton.TritonTuning``, or None for its defaults) to every
        block's SS2D core; benchmarks sweep launch settings this way."""
        for m in self.modules():
            if isinstance(m, SS2D):
                m.scan_tuning = tuning
        return self

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (fine-tuning on another label set)."""
        self.config = self.config.replace(num_classes=num_classes)
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.classifier.head = head.to(self.classifier.norm.weight.device)

    @property
    def stage_channels(self) -> list[int]:
        return list(self.config.dims)

    @property
    def size_multiple(self) -> int:
        """Input sides that are multiples of this run every stage without padding: the stem's stride
        times 2 per downsampling (32 for the released configs)."""
        return self.config.patch_size * 2 ** (len(self.config.dims) - 1)

    def export_dynamic_shapes(self, max_batch: int = 1024, max_side: int = 4096) -> dict:
        """``dynamic_shapes`` for ``torch.export.export(model, (x,), dynamic_shapes=...)``: batch,
        height and width free, height and width independently, as multiples of ``size_multiple``
        from two multiples up (64 for the released configs).

        One multiple is left out because the last stage's map is then a single row or column, for
        which PyTorch's layout rules (channels-last convolutions and norms) take another branch
        than for larger maps: the exporter would specialise on it. The example input should have a
        batch of at least 2 (the exporter specialises sizes of 1).
        """
        from torch.export import Dim

        step = self.size_multiple
        most = max(2, max_side // step)
        batch = Dim("batch", min=1, max=max_batch)
        height = Dim("height_steps", min=2, max=most)
        width = Dim("width_steps", min=2, max=most)
        return {"x": {0: batch, 2: step * height, 3: step * width}}

    # -- forward ---------------------------------------------------------------------------------
    def _nchw(self, x):
        return x if self._layout.channels_first else x.permute(0, 3, 1, 2)

    def _stages(self, x: torch.Tensor, keep_features: bool):
        if self._layout.channels_first:
            # Channel-first models run channels-last in memory (NCHW shapes, NHWC strides): per-pixel
            # linears and LayerNorms are then plain row operations and the native scan reads its
            # working layout directly, with no transposes.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed(x)
        features = []
        for layer in self.layers:
            x = layer.blocks(x)
            if keep_features:
                features.append(self._nchw(x).contiguous())
            x = layer.downsample(x)
        return x, features

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-stage NCHW feature maps (contiguous): each stage's block output, before its downsample."""
        return self._stages(x, keep_features=True)[1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Classifier on the last stage's NCHW map: LayerNorm, global average pool, linear."""
        if not self._layout.channels_first:
            x = x.permute(0, 2, 3, 1)
        c = self.classifier
        x = c.flatten(c.avgpool(c.permute(c.norm(x))))
        return x if pre_logits else c.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self._nchw(self._stages(x, keep_features=False)[0]))


def from_official_config(config: dict[str, Any]) -> VSSM:
    """Build our model from the official ``VSSM(**kwargs)`` keyword set."""
    return VSSM(VMambaConfig.from_official(config))


# ------------------------------------------------------------------------------------------------
# Released variants
# ------------------------------------------------------------------------------------------------

RELEASE_URL = "https://github.com/MzeroMiko/VMamba/releases/download/{tag}/{file}"


@dataclass(frozen=True)
class ModelSpec:
    """A released configuration with the authors' reported numbers (docs/design.md §2.2)."""

    name: str
    config: VMambaConfig
    paper_name: str
    official_name: str          # yaml name in classification/configs/vssm
    checkpoint: str             # release asset file name
    release_tag: str
    top1: float                 # README top-1 on ImageNet-1k val, 224x224
    top5: float | None          # re-validated top-5 (root vmamba.py), when published
    params: int
    flops: int                  # official convention (one multiply-add = 1 FLOP), 224x224
    aliases: tuple[str, ...] = ()
    preprocess: Preprocess = Preprocess()   # the official eval pipeline, 224 from a 256 short side

    @property
    def url(self) -> str:
        return RELEASE_URL.format(tag=self.release_tag.replace("#", "%23"), file=self.checkpoint)

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def _v0(dims, depths, drop_path):
    return VMambaConfig(dims=dims, depths=depths, d_state=16, ssm_ratio=2.0, ssm_conv_bias=True, gated=True,
                        mlp_ratio=0.0, drop_path_rate=drop_path, channels_first=False, stem="v1", downsample="v1")


def _v2(dims, depths, ratio, drop_path):
    return VMambaConfig(dims=dims, depths=depths, d_state=1, ssm_ratio=ratio, ssm_conv_bias=False, gated=False,
                        mlp_ratio=4.0, drop_path_rate=drop_path, channels_first=True, stem="v2", downsample="v3")


_C96, _C128 = (96, 192, 384, 768), (128, 256, 512, 1024)

_SPECS = [
    ModelSpec("vmamba-v0-tiny", _v0(_C96, (2, 2, 9, 2), 0.2), "Vanilla-VMamba-T", "vmambav0_tiny",
              "vssmtiny_dp01_ckpt_epoch_292.pth", "#v0cls", 82.2, 96.032, 22_893_448, 5_626_895_040),
    ModelSpec("vmamba-v0-small", _v0(_C96, (2, 2, 27, 2), 0.3), "Vanilla-VMamba-S", "vmambav0_small",
              "vssmsmall_dp03_ckpt_epoch_238.pth", "#v0cls", 83.5, 96.470, 44_417_416, 11_231_522_784),
    ModelSpec("vmamba-v0-base", _v0(_C128, (2, 2, 27, 2), 0.6), "Vanilla-VMamba-B", "vmambav0_base",
              "vssmbase_dp06_ckpt_epoch_241.pth", "#v0cls", 83.7, 96.624, 76_254_056, 18_020_115_136),
    ModelSpec("vmamba-tiny-s2l5", _v2(_C96, (2, 2, 5, 2), 2.0, 0.2), "VMamba-T[s2l5]", "vmambav2_tiny",
              "vssm_tiny_0230_ckpt_epoch_262.pth", "#v2cls", 82.5, 95.996, 30_705_832, 4_857_742_080),
    ModelSpec("vmamba-small-s2l15", _v2(_C96, (2, 2, 15, 2), 2.0, 0.3), "VMamba-S[s2l15]", "vmambav2_small",
              "vssm_small_0229_ckpt_epoch_222.pth", "#v2cls", 83.6, 96.594, 50_147_752, 8_715_774_720,
              aliases=("vmamba-small",)),
    ModelSpec("vmamba-base-s2l15", _v2(_C128, (2, 2, 15, 2), 2.0, 0.6), "VMamba-B[s2l15]", "vmambav2_base",
              "vssm_base_0229_ckpt_epoch_237.pth", "#v2cls", 83.9, 96.712, 88_557_800, 15_358_944_256,
              aliases=("vmamba-base",)),
    ModelSpec("vmamba-tiny-s1l8", _v2(_C96, (2, 2, 8, 2), 1.0, 0.2), "VMamba-T[s1l8]", "vmambav2v_tiny",
              "vssm1_tiny_0230s_ckpt_epoch_264.pth", "#v2cls", 82.6, None, 30_249_064, 4_905_609_984,
              aliases=("vmamba-tiny",)),
    ModelSpec("vmamba-small-s1l20", _v2(_C96, (2, 2, 20, 2), 1.0, 0.3), "VMamba-S[s1l20]", "vmambav2v_small",
              "vssm1_small_0229s_ckpt_epoch_240.pth", "#v2cls", 83.3, 96.426, 49_012_840, 8_612_211_456),
    ModelSpec("vmamba-base-s1l20", _v2(_C128, (2, 2, 20, 2), 1.0, 0.5), "VMamba-B[s1l20]", "vmambav2v_base",
              "vssm1_base_0229s_ckpt_epoch_225.pth", "#v2cls", 83.8, 96.614, 86_614_504, 15_220_859_904),
]

MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}
DEFAULT_MODEL = "vmamba-tiny"

_ALIASES: dict[str, str] = {}
for _s in _SPECS:
    for _a in (_s.name, _s.official_name, *_s.aliases):
        _ALIASES[_a.lower().replace("_", "-")] = _s.name


def list_models() -> list[str]:
    return list(MODELS)


def resolve_model_name(name: str) -> str:
    """Registered name for ``name`` (aliases, official yaml names, '_' or '-' all accepted)."""
    key = name.lower().replace("_", "-")
    if key not in _ALIASES:
        import difflib

        close = difflib.get_close_matches(key, list(_ALIASES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint}; `vmamba models` lists them")
    return _ALIASES[key]


def get_model_spec(name: str) -> ModelSpec:
    return MODELS[resolve_model_name(name)]


def create_model(name: str = DEFAULT_MODEL, **overrides) -> VSSM:
    """Build a registered model with the official initialisation; ``overrides`` change config fields
    (e.g. num_classes, drop_path_rate). ``vmamba_cli.create_model`` (``vmamba_cli.weights.create_model``)
    also takes ``weights=`` to load a checkpoint."""
    return VSSM(get_model_spec(name).config, **overrides)
