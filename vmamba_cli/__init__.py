"""vmamba: the VMamba vision backbone as a tool (model, kernels, weights, command line)."""

__version__ = "0.1.0"

from vmamba_cli.model import (MODELS, VMambaConfig, VSSM, create_model, from_official_config,  # noqa: E402
                              get_model_spec, list_models)

__all__ = ["__version__", "MODELS", "VMambaConfig", "VSSM", "create_model", "from_official_config",
           "get_model_spec", "list_models"]
