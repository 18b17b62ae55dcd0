"""Weights: reading official checkpoints safely, our safetensors format, and the release registry."""

from .loading import (CheckpointError, atomic_write, check_state_dict, checkpoint_filter_fn,
                      load_weights_into, read_metadata, read_state_dict, save_weights)
from .model_io import (LoadedModel, load_model, read_class_names, register_weights_resolver,
                       resolve_weights_path, save_model)

__all__ = [
    "CheckpointError", "atomic_write", "check_state_dict", "checkpoint_filter_fn", "load_weights_into",
    "read_metadata", "read_state_dict", "save_weights",
    "LoadedModel", "load_model", "read_class_names", "register_weights_resolver", "resolve_weights_path",
    "save_model",
]
