"""The base of an adapters-only checkpoint.

A LoRA run started from a base (checkpoint.init_from) saves only what trains: its checkpoints
record the base by its absolute step directory and a digest of its arrays' checksums
(`base_reference`), and every restore finds it there (`locate_base`).
"""

from __future__ import annotations

from etils import epath

from minids_jax.checkpoint import integrity
from minids_jax.checkpoint import store as ckpt
from minids_jax.checkpoint.store import CheckpointError


class MissingBaseError(CheckpointError):
    """The base of an adapters-only checkpoint is gone, or is another checkpoint now."""


def base_reference(step_dir: epath.Path, meta: dict) -> dict[str, str | None]:
    """What an adapters-only checkpoint records of its base, the checkpoint at `step_dir`
    with metadata `meta`: where it is, and a digest of its arrays' checksums."""
    return {"step_dir": str(step_dir),
            "digest": integrity.digest(meta.get("checksums", {}).get("model"))}


def locate_base(base: dict, referrer: epath.Path,
                elsewhere: str = "") -> tuple[epath.Path, int]:
    """(checkpoints directory, step) of the base an adapters-only checkpoint (`referrer`)
    records: at its place, or else in `elsewhere` (a resumed run's checkpoint.init_from: a
    moved base), if its arrays' checksums are the recorded ones. MissingBaseError if not."""
    recorded = epath.Path(base["step_dir"])
    places = [recorded]
    if elsewhere and ckpt.absolute_path(elsewhere).exists():
        directory, step = ckpt.resolve(elsewhere)
        places += [directory / recorded.name, directory / str(step)]
    other = None
    for place in dict.fromkeys(places):
        if not (place / "model").exists():
            continue
        sums = ckpt.read_meta(place.parent, int(place.name)).get("checksums", {}).get("model")
        if base.get("digest") in (None, integrity.digest(sums)):
            return place.parent, int(place.name)
        other = other or place
    if other is not None:
        raise MissingBaseError(
            f"the LoRA checkpoint {referrer} holds adapters only, trained on the base "
            f"{recorded}, and {other} is another checkpoint now (its arrays' checksums "
            f"differ); put the base it was trained on back at {recorded}.")
    moved = ", or resume with --config.checkpoint.init_from set to where it is now" \
        if elsewhere else ""
    raise MissingBaseError(
        f"the LoRA checkpoint {referrer} holds adapters only, on the base {recorded}, which "
        f"is gone (moved or deleted); put the base back at {recorded} (a symlink will "
        f"do){moved}.")
