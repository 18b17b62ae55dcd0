"""Weights: reading official checkpoints safely, our safetensors format, and the release registry."""

from vmamba_cli.errors import CheckpointError

from .loading import (atomic_write, check_state_dict, checkpoint_filter_fn, load_weights_into, read_metadata,
                      read_state_dict, save_weights)
from .registry import (DownloadError, NetworkError, WeightsEntry, cache_dir, fetch_weights, find_entry, get_entry,
                       list_entries, model_for_file, weights_status)
from .model_io import LoadedModel, create_model, load_model, read_class_names, resolve_weights_path, save_model
from .convert import ConversionResult, convert_checkpoint

__all__ = [
    "CheckpointError", "atomic_write", "check_state_dict", "checkpoint_filter_fn", "load_weights_into",
    "read_metadata", "read_state_dict", "save_weights",
    "LoadedModel", "create_model", "load_model", "read_class_names", "resolve_weights_path", "save_model",
    "DownloadError", "NetworkError", "WeightsEntry", "cache_dir", "fetch_weights", "find_entry", "get_entry",
    "list_entries", "model_for_file", "weights_status", "ConversionResult", "convert_checkpoint",
]
