"""Configs: frozen dataclasses for every stage, and `--set a.b=VALUE` overrides typed from their fields.

An experiment file's `get_config(arg)` returns one of the stage configs; the launcher applies the overrides and
runs `l2jax.stages.<config.stage>.run(config, run_dir)`. The machinery and shared configs live in
`config/core.py`, each stage's configs in a module named for it.
"""
from l2jax.config.core import *  # noqa: F401,F403
from l2jax.config.sft import *  # noqa: F401,F403
from l2jax.config.reward import *  # noqa: F401,F403
from l2jax.config.ppo import *  # noqa: F401,F403
from l2jax.config.rejection import *  # noqa: F401,F403
from l2jax.config.gatt import *  # noqa: F401,F403
from l2jax.config.rlhf import *  # noqa: F401,F403
from l2jax.config.overoptimization import *  # noqa: F401,F403
from l2jax.config.dpo import *  # noqa: F401,F403
from l2jax.config.core import _field_types, _parse_value, _valid_keys, _validating  # noqa: F401
