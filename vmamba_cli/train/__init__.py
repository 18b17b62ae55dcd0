"""`vmamba train`: the official recipe in one process or under torchrun, resumable exactly.

Modules by concern: ``config`` (settings and TOML presets), ``data`` (datasets, augmentation,
samplers), ``schedule`` (LR schedule, weight-decay groups, EMA), ``architecture`` (the network),
``state`` (position, RNG states, the state file, resume), ``checkpoints`` (what a run saves and
restores), ``artifacts`` (config.json, metrics.jsonl, summary.json, curves.png), ``stop`` (Ctrl-C
handling, step hooks) and ``loop`` (the Trainer).
"""

from vmamba_cli.errors import DataError, ResumeError, TrainingDiverged
from vmamba_cli.train.artifacts import plot_curves, read_metrics
from vmamba_cli.train.config import (TrainConfig, apply_overrides, config_to_json, load_config, parse_assignment,
                                     read_config_file)
from vmamba_cli.train.loop import Trainer, train
from vmamba_cli.train.state import STATE_FILE, config_for_resume, find_state, read_state
from vmamba_cli.train.stop import StepInfo

__all__ = ["STATE_FILE", "DataError", "ResumeError", "StepInfo", "TrainConfig", "Trainer", "TrainingDiverged",
           "apply_overrides", "config_for_resume", "config_to_json", "find_state", "load_config", "parse_assignment",
           "plot_curves", "read_config_file", "read_metrics", "read_state", "train"]
