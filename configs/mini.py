"""The PyTorch original's model and schedule, on random tokens: every field at its default.

The defaults live in `minids_jax/config.py` (docs/configuration.md lists them); this file only
turns them into a ConfigDict, so any field can be overridden with --config.GROUP.FIELD=VALUE.
"""

from minids_jax import config as config_lib


def get_config():
    return config_lib.default_config_dict()
