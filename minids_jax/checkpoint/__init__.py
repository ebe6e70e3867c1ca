"""Saved states on disk, read and written: orbax items with checksums (store.py), the base
of an adapters-only checkpoint (base.py), and loading in notebooks and tools (loading.py)."""

from minids_jax.checkpoint.base import MissingBaseError
from minids_jax.checkpoint.loading import load, load_params
from minids_jax.checkpoint.store import (
                                         CheckpointError,
                                         UnreadableCheckpointError,
                                         read_config,
                                         read_meta,
                                         resolve,
                                         save_model,
)

__all__ = ["CheckpointError", "MissingBaseError", "UnreadableCheckpointError", "load",
           "load_params", "read_config", "read_meta", "resolve", "save_model"]
