"""vmamba: the VMamba vision backbone as a tool (model, kernels, weights, command line).

This module only re-exports the public API; modules of the package import from the defining module
(vmamba_cli.model, vmamba_cli.weights, vmamba_cli.version), never from here.
"""

from vmamba_cli.version import __version__
from vmamba_cli.model import (MODELS, Preprocess, VMambaConfig, VSSM, from_official_config, get_model_spec,
                              list_models)
from vmamba_cli.weights import create_model  # create_model(name, weights=...) loads a checkpoint too

__all__ = ["__version__", "MODELS", "Preprocess", "VMambaConfig", "VSSM", "create_model", "from_official_config",
           "get_model_spec", "list_models"]
