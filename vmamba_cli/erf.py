"""Effective receptive field (ERF): gradient maps, their average, normalisation, measures and plots.

The method is the one of RepLKNet and the VMamba paper (docs/design.md §8)::

    out    = backbone(x)                         # last-stage NCHW map, no classifier
    score  = sum_c ReLU(out[:, c, h // 2, w // 2])
    map    = sum_rgb ReLU(d score / d x)         # (H, W), one per image
    ERF    = mean of the maps over N images      # maps with NaN/inf are skipped and counted

For display the averaged map is normalised per model, either as in the VMamba paper ("pow":
``map ** 0.2 / max``) or as in RepLKNet ("log": ``log10(map + 1) / max``), and drawn with the
'RdYlGn' colormap centred at 0 on one colour scale shared by all panels. The "high-contribution
area" (RepLKNet's ``get_rectangle``) is the smallest centred square holding more than a given
fraction of the map's total.

Everything here is plain Python; ``vmamba erf`` only parses options and prints.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from vmamba_cli.data import ImageError, eval_transform, find_images, load_image
from vmamba_cli.kernels import resolve_backend
from vmamba_cli.peers import build_peer, check_weights, is_vit, parse_peer, peer_label, vit_patch_size
from vmamba_cli.weights import atomic_write, load_model, save_weights

DEFAULT_RESOLUTION = 1024
DEFAULT_NUM_IMAGES = 50
AREA_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
NORMS = ("pow", "log")
COLORMAP = "RdYlGn"

# torchvision families whose last feature map we know how to take (see TorchvisionBackbone).
TORCHVISION_FAMILIES = ("resnet", "resnext", "wide_resnet", "convnext", "swin", "vit")


# ------------------------------------------------------------------------------------------------
# Backbones: image -> last-stage NCHW feature map
# ------------------------------------------------------------------------------------------------

class VMambaBackbone(nn.Module):
    """A VSSM without its classifier: stem and every stage, last stage's NCHW map out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)[-1]


class ViTBackbone(nn.Module):
    """The patch-token grid after the last encoder layer of a torchvision VisionTransformer, as NCHW.

    Patch embedding, class token, position embeddings and every encoder layer run as in the
    classifier; the final LayerNorm and the head are left out (as the classifier norm is for the
    other families), and the class token is dropped, so the output is the (H / p, W / p) grid of
    patch tokens and the ERF's central position is the central patch token.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        n, _, h, w = x.shape
        tokens = net._process_input(x)
        tokens = torch.cat([net.class_token.expand(n, -1, -1), tokens], dim=1)
        encoder = net.encoder
        tokens = encoder.layers(encoder.dropout(tokens + encoder.pos_embedding))
        grid = tokens[:, 1:].reshape(n, h // net.patch_size, w // net.patch_size, -1)
        return grid.permute(0, 3, 1, 2)


class TorchvisionBackbone(nn.Module):
    """The last feature stage of a torchvision classifier, as NCHW.

    ResNets: stem and layer1..layer4. ConvNeXt: ``features``. Swin: ``features`` (NHWC there),
    permuted to NCHW. ViT: the patch-token grid of the last encoder layer (``ViTBackbone``), built
    for ``image_size``. ``weights`` is a torchvision weights tag (``IMAGENET1K_V2``, ``DEFAULT``) read
    from torchvision's cache (``vmamba_cli.peers``), or None for torchvision's random init.
    """

    def __init__(self, name: str, weights: str | None = None, *, image_size: int | None = None,
                 download: bool = False):
        super().__init__()
        family = torchvision_family(name)
        net = build_peer(name, weights, image_size=image_size, download=download)
        self.name, self.family = name, family
        if family == "vit":
            self.features = ViTBackbone(net)
        elif family in ("resnet", "resnext", "wide_resnet"):
            self.features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                          net.layer1, net.layer2, net.layer3, net.layer4)
        else:
            self.features = net.features
        self.channels_last = family == "swin"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        return y.permute(0, 3, 1, 2) if self.channels_last else y


def torchvision_family(name: str) -> str:
    """The family of a torchvision model name we can take a feature map from, or ValueError."""
    for family in TORCHVISION_FAMILIES:
        if name.lower().startswith(family):
            return family
    raise ValueError(f"--compare supports torchvision ResNet/ResNeXt/Wide-ResNet, ConvNeXt, Swin and ViT models, "
                     f"not {name!r} (e.g. resnet50, convnext_tiny, swin_t, vit_b_16)")


def prepare_backbone(backbone: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Eval mode, on ``device``, parameters frozen: only the input gradient is wanted, and frozen
    weights let autograd skip every weight-gradient product."""
    return backbone.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# One map, and the average over many inputs
# ------------------------------------------------------------------------------------------------

def input_gradient_map(backbone: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ERF map of one input batch: (H, W) float32 tensor, sum over batch and colour of ReLU(grad).

    The score is the sum over channels of the ReLU'd feature vector at the central position
    (h // 2, w // 2) of the backbone output. The autograd graph is freed before returning.
    """
    x = x.detach().requires_grad_(True)
    out = backbone(x)
    if out.dim() != 4:
        raise ValueError(f"backbone must return an (N, C, H, W) map, got shape {tuple(out.shape)}")
    h, w = out.shape[-2:]
    score = torch.relu(out[:, :, h // 2, w // 2]).sum()
    (grad,) = torch.autograd.grad(score, x)
    return torch.relu(grad).sum(dim=(0, 1)).detach()


@dataclass
class ERFMap:
    """Averaged ERF of one model, with the bookkeeping of how it was made."""

    raw: np.ndarray                  # (H, W) float64 mean of the per-image maps, un-normalised
    used: int                        # images averaged
    skipped_nonfinite: int           # images whose map had NaN/inf (left out of the mean)
    seconds: float                   # wall time for all images (forward + backward)
    skipped_names: list[str] = field(default_factory=list)

    @property
    def seconds_per_image(self) -> float | None:
        done = self.used + self.skipped_nonfinite
        return self.seconds / done if done else None


def average_erf(backbone: Callable[[torch.Tensor], torch.Tensor],
                inputs: Iterable[tuple[str, torch.Tensor]], num_images: int | None = None, *,
                device: torch.device | str | None = None,
                on_image: Callable[[str, bool], None] | None = None) -> ERFMap:
    """Mean ERF map over ``inputs`` ((name, (1, 3, H, W) tensor) pairs).

    Inputs are consumed until ``num_images`` finite maps have been averaged (or the inputs run
    out); maps containing NaN or inf are skipped, counted and named. ``on_image(name, used)``
    is called after each input (for progress bars).
    """
    total: torch.Tensor | None = None
    used = skipped = 0
    skipped_names: list[str] = []
    start = time.perf_counter()
    for name, x in inputs:
        if num_images is not None and used >= num_images:
            break
        if device is not None:
            x = x.to(device)
        grad_map = input_gradient_map(backbone, x).double()
        ok = bool(torch.isfinite(grad_map).all())
        if ok:
            total = grad_map if total is None else total + grad_map
            used += 1
        else:
            skipped += 1
            skipped_names.append(name)
        del grad_map, x
        if on_image is not None:
            on_image(name, ok)
    seconds = time.perf_counter() - start
    if total is None:
        raise ValueError(f"no usable ERF map: {skipped} input(s) gave NaN/inf maps" if skipped
                         else "no input images")
    return ERFMap((total / used).cpu().numpy(), used, skipped, seconds, skipped_names)


# ------------------------------------------------------------------------------------------------
# Inputs: real photos shipped in installed packages, an image folder, or Gaussian noise
# ------------------------------------------------------------------------------------------------

def _skimage(name: str):
    def load():
        import skimage.data

        return getattr(skimage.data, name)()
    return load


def _motorcycle(index: int):
    def load():
        import skimage.data

        return skimage.data.stereo_motorcycle()[index]
    return load


def _sklearn(filename: str):
    def load():
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)
    return load


def _matplotlib(filename: str):
    def load():
        from matplotlib import cbook
        from PIL import Image

        with Image.open(cbook.get_sample_data(filename, asfileobj=False)) as im:
            return np.asarray(im.convert("RGB"))
    return load


# Real photographs that ship inside scikit-image, scikit-learn and matplotlib wheels and load
# without a network (docs/design.md §12.2). Colour first; the grey ones are repeated over RGB.
BUILTIN_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "motorcycle_left": _motorcycle(0),
    "motorcycle_right": _motorcycle(1),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
    "camera": _skimage("camera"),
    "coins": _skimage("coins"),
    "moon": _skimage("moon"),
    "clock": _skimage("clock"),
    "cell": _skimage("cell"),
    "grass": _skimage("grass"),
    "gravel": _skimage("gravel"),
    "brick": _skimage("brick"),
}


def builtin_photo(name: str):
    """One of BUILTIN_PHOTOS as an RGB PIL image."""
    from PIL import Image

    array = BUILTIN_PHOTOS[name]()
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(array[:, :, :3]).astype(np.uint8), mode="RGB")


def erf_transform(resolution: int = DEFAULT_RESOLUTION):
    """Resize the short side to ``resolution`` (bicubic), center-crop it, ImageNet mean/std."""
    return eval_transform(resolution, crop_pct=1.0)


@dataclass
class InputSource:
    """Where ERF inputs come from; ``iterate()`` gives a fresh stream of (name, (1,3,R,R) tensor).

    ``kind`` is "builtin", "folder" or "noise". Unreadable files are reported through
    ``on_error(message)`` and skipped.
    """

    kind: str
    resolution: int = DEFAULT_RESOLUTION
    files: list[Path] = field(default_factory=list)
    seed: int = 0
    noise_count: int = DEFAULT_NUM_IMAGES

    @property
    def available(self) -> int:
        return {"builtin": len(BUILTIN_PHOTOS), "folder": len(self.files), "noise": self.noise_count}[self.kind]

    def describe(self) -> str:
        if self.kind == "builtin":
            return f"{len(BUILTIN_PHOTOS)} built-in photos (scikit-image, scikit-learn, matplotlib)"
        if self.kind == "noise":
            return f"Gaussian noise N(0, 1) in normalised input space, seed {self.seed}"
        return f"{len(self.files)} image file(s)"

    def iterate(self, on_error: Callable[[str], None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        if self.kind == "noise":
            generator = torch.Generator().manual_seed(self.seed)
            for i in range(self.noise_count):
                yield f"noise-{i}", torch.randn(1, 3, self.resolution, self.resolution, generator=generator)
            return
        transform = erf_transform(self.resolution)
        if self.kind == "builtin":
            for name in BUILTIN_PHOTOS:
                yield name, transform(builtin_photo(name))[None]
            return
        for path in self.files:
            try:
                image = load_image(path)
            except ImageError as exc:
                if on_error is not None:
                    on_error(str(exc))
                continue
            yield str(path), transform(image)[None]


def folder_source(paths: Sequence[str | os.PathLike], resolution: int = DEFAULT_RESOLUTION
                  ) -> tuple[InputSource, list[str]]:
    """InputSource over files/folders/globs, plus one-line errors for inputs that matched nothing."""
    scan = find_images(paths)
    return InputSource("folder", resolution, files=list(scan.files)), [str(e) for e in scan.errors]


# ------------------------------------------------------------------------------------------------
# Normalisation and the high-contribution area
# ------------------------------------------------------------------------------------------------

def normalise_erf(raw: np.ndarray, norm: str = "pow") -> np.ndarray:
    """Display normalisation: "pow" (VMamba: map**0.2 / max) or "log" (RepLKNet: log10(map+1) / max)."""
    raw = np.asarray(raw, dtype=np.float64)
    if norm == "pow":
        data = np.power(np.clip(raw, 0, None), 0.2)
    elif norm == "log":
        data = np.log10(np.clip(raw, 0, None) + 1.0)
    else:
        raise ValueError(f"unknown normalisation {norm!r}; choose from {', '.join(NORMS)}")
    top = float(data.max()) if data.size else 0.0
    return data / top if top > 0 else data


@dataclass(frozen=True)
class AreaRatio:
    threshold: float
    side: int                 # side of the smallest centred square holding > threshold of the total
    area_ratio: float         # side * side / (H * W)

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "side": self.side, "area_ratio": self.area_ratio}


def high_contribution_area(data: np.ndarray, thresholds: Sequence[float] = AREA_THRESHOLDS) -> list[AreaRatio]:
    """RepLKNet's ``get_rectangle`` for each threshold: the smallest square centred at
    (H // 2, W // 2), of odd side 2i + 1, whose sum is more than ``threshold`` of the map's total.

    Unlike RepLKNet this starts at i = 0 (a single pixel) and, when no centred square inside the
    map is enough (even sizes leave the first row/column out), answers with the whole map
    (side max(H, W), ratio 1). Sums use an integral image, so all sizes cost one pass.
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {data.shape}")
    h, w = data.shape
    total = float(data.sum())
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = data.cumsum(0).cumsum(1)
    cy, cx = h // 2, w // 2
    radii = np.arange(0, min(cy, h - 1 - cy, cx, w - 1 - cx) + 1)
    top, bottom, left, right = cy - radii, cy + radii + 1, cx - radii, cx + radii + 1
    sums = integral[bottom, right] - integral[top, right] - integral[bottom, left] + integral[top, left]
    results = []
    for threshold in thresholds:
        if total <= 0:
            hits = np.array([], dtype=int)
        else:
            hits = np.nonzero(sums / total > threshold)[0]
        if hits.size:
            side = int(2 * radii[hits[0]] + 1)
            results.append(AreaRatio(float(threshold), side, side * side / (h * w)))
        else:
            results.append(AreaRatio(float(threshold), max(h, w), 1.0))
    return results


# ------------------------------------------------------------------------------------------------
# Rendering and saving
# ------------------------------------------------------------------------------------------------

def centred_colormap(vmin: float, vmax: float, center: float = 0.0, name: str = COLORMAP):
    """The part of a diverging colormap that seaborn's ``heatmap(center=...)`` shows for [vmin, vmax]:
    the colormap spans center +- the larger half-range, so a map in [0, 1] with center 0 uses the
    yellow-to-green half of RdYlGn (as in the RepLKNet and VMamba figures)."""
    import matplotlib
    from matplotlib.colors import ListedColormap, Normalize

    half = max(vmax - center, center - vmin) or 1.0
    lo, hi = Normalize(center - half, center + half)([vmin, vmax])
    return ListedColormap(matplotlib.colormaps[name](np.linspace(lo, hi, 256)))


def render_erf(panels: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike, *,
               colorbar_label: str = "", panel_inches: float = 4.0, dpi: int = 100) -> Path:
    """Heat maps side by side (one per (title, normalised map)), one colour scale and colour bar.

    Written atomically as PNG (or whatever matplotlib infers from the suffix).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("nothing to render")
    vmin = min(float(np.nanmin(m)) for _, m in panels)
    vmax = max(float(np.nanmax(m)) for _, m in panels)
    if vmax <= vmin:
        vmax = vmin + 1.0
    cmap = centred_colormap(vmin, vmax)
    n = len(panels)
    # A bare Figure on the Agg canvas: no pyplot state, no GUI backend, safe in threads and tests.
    fig = Figure(figsize=(panel_inches * n + 0.9, panel_inches + 0.5), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    image = None
    for ax, (title, data) in zip(axes, panels):
        image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="antialiased")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(image, ax=list(axes), fraction=0.05 / max(1, n) ** 0.5, pad=0.02, shrink=0.9)
    bar.outline.set_visible(False)
    if colorbar_label:
        bar.set_label(colorbar_label)
    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=suffix))


def save_erf_maps(path: str | os.PathLike, maps: Sequence[tuple[str, np.ndarray]],
                  metadata: dict | None = None) -> Path:
    """Save raw (un-normalised) maps: ``.npy`` (one map (H, W), several stacked (P, H, W) in panel
    order) or ``.safetensors`` (one float32 tensor per panel title, metadata as JSON strings)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arrays = [np.asarray(m, dtype=np.float32) for _, m in maps]
        stacked = arrays[0] if len(arrays) == 1 else np.stack(arrays)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, stacked)
        return atomic_write(path, write)
    if suffix == ".safetensors":
        tensors = {title: torch.from_numpy(np.asarray(m, dtype=np.float32)) for title, m in maps}
        if len(tensors) != len(maps):
            raise ValueError("panel titles must be unique to save them as safetensors keys")
        return save_weights(path, tensors, {"content": "vmamba erf raw maps", **(metadata or {})})
    raise ValueError(f"{path}: --save-map must end in .npy or .safetensors")


def load_erf_maps(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read back what ``save_erf_maps`` wrote ("map" or "map-<i>" keys for .npy files)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        data = np.load(path)
        return {"map": data} if data.ndim == 2 else {f"map-{i}": m for i, m in enumerate(data)}
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


# ------------------------------------------------------------------------------------------------
# The whole command as one call
# ------------------------------------------------------------------------------------------------

@dataclass
class PanelSpec:
    """One heat map to compute: a VMamba (registered name + weights, or fresh init) or a
    torchvision model (released weights by tag, or random init)."""

    title: str
    kind: str                          # "vmamba" | "torchvision"
    model: str | None                  # None: the architecture of ``weights`` (default vmamba-tiny)
    weights: str | None = None         # VMamba: file/registry name/URL; torchvision: weights tag
    ema: bool = False
    init_like: str | None = None       # fresh init of the architecture these weights describe


@dataclass
class PanelResult:
    spec: PanelSpec
    erf: ERFMap
    normalised: np.ndarray
    areas: list[AreaRatio]
    model_name: str                    # resolved registry name, or the torchvision name
    weights_file: str | None = None    # torchvision checkpoint read from the cache

    def to_dict(self) -> dict:
        e = self.erf
        return {
            "title": self.spec.title, "kind": self.spec.kind, "model": self.model_name,
            "weights": self.spec.weights, "weights_file": self.weights_file,
            "images_used": e.used, "images_skipped_nan": e.skipped_nonfinite,
            "skipped_names": e.skipped_names,
            "seconds": round(e.seconds, 3),
            "seconds_per_image": None if e.seconds_per_image is None else round(e.seconds_per_image, 3),
            "map_shape": list(e.raw.shape),
            "raw_max": float(e.raw.max()), "raw_sum": float(e.raw.sum()),
            "raw_center": float(e.raw[e.raw.shape[0] // 2, e.raw.shape[1] // 2]),
            "area": [a.to_dict() for a in self.areas],
        }


def build_backbone(spec: PanelSpec, *, seed: int = 0, scan_backend: str = "auto", resolution: int | None = None,
                   download: bool = False) -> tuple[nn.Module, str]:
    """The backbone for a panel and its resolved model name. Random inits are seeded by ``seed``;
    ``resolution`` sizes a ViT's position grid; ``download`` lets torchvision fetch missing peer weights."""
    if spec.kind == "torchvision":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = TorchvisionBackbone(spec.model, spec.weights, image_size=resolution, download=download)
            return backbone, spec.model
    if spec.init_like is not None:
        # "before" of --before-after: same architecture as the trained weights, official init
        template = load_model(spec.model, spec.init_like, ema=spec.ema)
        name, config, model_class = template.name, template.model.config, type(template.model)
        del template
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loaded = load_model(spec.model, spec.weights, ema=spec.ema)
        model, name = loaded.model, loaded.name
    if scan_backend != "auto" and hasattr(model, "set_scan_backend"):
        model.set_scan_backend(scan_backend)
    return VMambaBackbone(model), name


def panel_specs(models: Sequence[str | None], weights: Sequence[str] = (), *, before_after: bool = False,
                compare: Sequence[str] = (), ema: bool = False) -> list[PanelSpec]:
    """Panels for the CLI's options: each --model (with its --weights, or fresh init), both states
    with ``before_after``, then each --compare torchvision model (``name`` for random init,
    ``name:TAG`` for torchvision's released weights). A model of None takes the architecture of
    its weights (vmamba-tiny without weights)."""
    models = list(models) or [None]
    if weights and len(weights) != len(models):
        raise ValueError(f"give one --weights per --model ({len(models)} model(s), {len(weights)} weights)")
    if before_after and not weights:
        raise ValueError("--before-after compares the fresh init with trained weights: give --weights")
    peers = [parse_peer(text) for text in compare]
    labels = []
    for name, tag in peers:
        torchvision_family(name)
        labels.append(peer_label(name, tag))  # unknown tags fail here, before anything is computed
    specs = []
    for i, model in enumerate(models):
        w = weights[i] if weights else None
        if w is None:
            specs.append(PanelSpec(f"{model or 'vmamba-tiny'} (fresh init)", "vmamba", model or "vmamba-tiny"))
            continue
        label = model or Path(w).stem
        if before_after:
            specs.append(PanelSpec(f"{label} (fresh init)", "vmamba", model, None, ema, init_like=w))
        specs.append(PanelSpec(f"{label} ({Path(w).name})", "vmamba", model, w, ema))
    for (name, tag), label in zip(peers, labels):
        specs.append(PanelSpec(f"{name} ({label})", "torchvision", name, tag))
    titles = [s.title for s in specs]
    for i, s in enumerate(specs):  # repeated models get numbered titles (safetensors keys must differ)
        if titles.count(s.title) > 1:
            s.title = f"{s.title} #{titles[:i + 1].count(s.title)}"
    return specs


def compute_panels(specs: Sequence[PanelSpec], source: InputSource, *, num_images: int = DEFAULT_NUM_IMAGES,
                   norm: str = "pow", thresholds: Sequence[float] = AREA_THRESHOLDS,
                   device: torch.device | str = "cpu", seed: int = 0, scan_backend: str = "auto",
                   download: bool = False,
                   on_panel_start: Callable[[PanelSpec, int], None] | None = None,
                   on_image: Callable[[str, bool], None] | None = None,
                   on_error: Callable[[str], None] | None = None) -> list[PanelResult]:
    """Average ERF maps for every panel over the same inputs; normalise and measure each.

    ``on_panel_start(spec, expected_images)``, ``on_image(name, used)`` and ``on_error(message)``
    report progress (unreadable images are reported once, for the first panel). Released peer
    weights must be in torchvision's cache unless ``download`` (checked for every panel before the
    first is computed: ``vmamba_cli.peers.PeerWeightsMissing``), and ViTs need a resolution
    divisible by their patch size.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown normalisation {norm!r}; choose from {', '.join(NORMS)}")
    if num_images < 1:
        raise ValueError("--num-images must be at least 1")
    if scan_backend != "auto":
        try:
            resolve_backend(scan_backend, torch.device(device))
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None
    files = {}
    for spec in specs:
        if spec.kind != "torchvision":
            continue
        if is_vit(spec.model) and source.resolution % vit_patch_size(spec.model):
            raise ValueError(f"{spec.model} needs --resolution divisible by its patch size "
                             f"{vit_patch_size(spec.model)}, got {source.resolution}")
        path = check_weights(spec.model, spec.weights, download=download)
        files[spec.title] = None if path is None else str(path)
    results = []
    for index, spec in enumerate(specs):
        backbone, name = build_backbone(spec, seed=seed, scan_backend=scan_backend, resolution=source.resolution,
                                        download=download)
        backbone = prepare_backbone(backbone, device)
        if on_panel_start is not None:
            on_panel_start(spec, min(num_images, source.available))
        errors = on_error if index == 0 else None
        erf = average_erf(backbone, source.iterate(errors), num_images, device=device, on_image=on_image)
        del backbone
        normalised = normalise_erf(erf.raw, norm)
        results.append(PanelResult(spec, erf, normalised, high_contribution_area(normalised, thresholds), name,
                                   files.get(spec.title)))
    return results


NORM_LABELS = {"pow": "(ERF ** 0.2) / max", "log": "log10(ERF + 1) / max"}


def erf_report(results: Sequence[PanelResult], source: InputSource, *, norm: str, num_images: int,
               out: str | None, map_file: str | None, errors: Sequence[str] = ()) -> dict:
    """The JSON document of ``vmamba erf --json``."""
    return {
        "resolution": source.resolution,
        "inputs": source.kind,
        "inputs_description": source.describe(),
        "num_images_requested": num_images,
        "norm": norm,
        "area_measured_on": NORM_LABELS[norm],
        "out": out,
        "map_file": map_file,
        "panels": [r.to_dict() for r in results],
        "errors": list(errors),
    }


__all__ = [
    "AREA_THRESHOLDS", "BUILTIN_PHOTOS", "DEFAULT_NUM_IMAGES", "DEFAULT_RESOLUTION", "NORMS",
    "AreaRatio", "ERFMap", "InputSource", "PanelResult", "PanelSpec", "TorchvisionBackbone", "VMambaBackbone",
    "ViTBackbone",
    "average_erf", "build_backbone", "builtin_photo", "centred_colormap", "compute_panels", "erf_report",
    "erf_transform", "folder_source", "high_contribution_area", "input_gradient_map", "load_erf_maps",
    "normalise_erf", "panel_specs", "prepare_backbone", "render_erf", "save_erf_maps", "torchvision_family",
]
