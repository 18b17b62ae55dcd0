"""The network a run trains: a registered model, its overrides, or pretrained weights with a new head."""

from __future__ import annotations

import torch
import torch.nn as nn

from vmamba_cli.train.config import TrainConfig

# VMambaConfig fields that define the architecture: a model differing in any is "custom".
ARCH_FIELDS = ("dims", "depths", "d_state", "ssm_ratio", "dt_rank", "ssm_conv", "ssm_conv_bias", "gated",
               "mlp_ratio", "channels_first", "stem", "downsample", "patch_size", "in_chans")


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth increasing linearly over all blocks up to ``rate`` (the official rule)."""
    from vmamba_cli.model import DropPath

    paths = [m for m in model.modules() if isinstance(m, DropPath)]
    for module, p in zip(paths, torch.linspace(0, rate, len(paths)).tolist()):
        module.p = p
    model.config = model.config.replace(drop_path_rate=rate)


def build_model(config: TrainConfig, num_classes: int, arch: dict | None = None):
    """(model, registered name or "custom"). ``arch`` (a saved VMambaConfig) wins when resuming."""
    from vmamba_cli.model import VMambaConfig, VSSM, create_model, get_model_spec, resolve_model_name

    name = resolve_model_name(config.model)
    if arch is not None:
        model = VSSM(VMambaConfig.from_dict(arch))
    elif config.pretrained:
        from vmamba_cli.weights import load_model

        arch_overrides = sorted(set(config.model_config) - {"drop_path_rate"})
        if arch_overrides:
            raise ValueError(f"model_config {', '.join(arch_overrides)} cannot be combined with --pretrained "
                             "(the architecture comes from the weights)")
        loaded = load_model(config.model, config.pretrained, num_classes=num_classes)
        model = loaded.model
        name = loaded.name
        if "drop_path_rate" in config.model_config:
            set_drop_path(model, float(config.model_config["drop_path_rate"]))
    else:
        overrides = dict(config.model_config)
        for key in ("dims", "depths"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        model = create_model(name, num_classes=num_classes, **overrides)
    if config.drop_path is not None:
        set_drop_path(model, config.drop_path)
    model_spec = get_model_spec(name) if name != "custom" else None
    if model_spec is not None and any(getattr(model.config, f) != getattr(model_spec.config, f) for f in ARCH_FIELDS):
        name = "custom"
    model.set_scan_backend(config.scan_backend)
    return model, name


def model_label(model: nn.Module, name: str, base: str) -> str:
    """The registered name, or "``base`` with dims a-b-c, depths x-y-z" for a custom architecture."""
    if name != "custom":
        return name
    cfg = model.config
    return f"{base} with dims {'-'.join(map(str, cfg.dims))}, depths {'-'.join(map(str, cfg.depths))}"
