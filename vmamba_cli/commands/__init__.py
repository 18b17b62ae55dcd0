"""Subcommands of the `vmamba` CLI: each module defines ``register(app)`` and stays thin
(parse options, call a library function, print)."""

# Modules listed here are registered in this order; each adds its own command(s).
COMMAND_MODULES = ("models", "predict", "weights", "eval", "train", "profile", "erf", "export")
