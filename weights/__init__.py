"""Weights: reading official checkpoints safely, our safetensors format, and the release registry."""

from .loading import (CheckpointError, atomic_write, check_state_dict, checkpoint_filter_fn,
                      load_weights_into, read_metadata, read_state_dict, save_weights)
from .model_io import (LoadedModel, load_model, read_class_names, register_weights_resolver,
                       resolve_weights_path, save_model)
# Importing the registry installs its resolver, so load_model accepts registry names and URLs.
from .registry import (DownloadError, NetworkError, WeightsEntry, cache_dir, fetch_weights, find_entry,  # noqa: E402
                       get_entry, list_entries, model_for_file, weights_status)
from .convert import ConversionResult, convert_checkpoint  # noqa: E402

__all__ = [
    "CheckpointError", "atomic_write", "check_state_dict", "checkpoint_filter_fn", "load_weights_into",
    "read_metadata", "read_state_dict", "save_weights",
    "LoadedModel", "load_model", "read_class_names", "register_weights_resolver", "resolve_weights_path",
    "save_model",
    "DownloadError", "NetworkError", "WeightsEntry", "cache_dir", "fetch_weights", "find_entry", "get_entry",
    "list_entries", "model_for_file", "weights_status", "ConversionResult", "convert_checkpoint",
]
