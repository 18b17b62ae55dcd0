"""Weights: reading official checkpoints safely, our safetensors format, and the release registry."""

from .loading import (CheckpointError, atomic_write, check_state_dict, checkpoint_filter_fn,
                      load_weights_into, read_metadata, read_state_dict, save_weights)

__all__ = [
    "CheckpointError", "atomic_write", "check_state_dict", "checkpoint_filter_fn", "load_weights_into",
    "read_metadata", "read_state_dict", "save_weights",
]
