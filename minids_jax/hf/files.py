"""The tensors of a Hugging Face directory: one `*.safetensors` file, or a sharded set named by
`model.safetensors.index.json`, read one tensor at a time from memory maps.

Reading maps the files with numpy rather than using the `safetensors` library's numpy API,
which has no bfloat16 or float8 (the dtypes of the published files); `ml_dtypes` (a jax
dependency) supplies those. A tensor is a view of the mapped file until it is converted, so
only the pages it touches are read. Writing uses the library (`safetensors.flax.save_file`
takes numpy arrays of every dtype here).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from minids_jax.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class TensorFileError(UserError):
    """A tensor file is missing, truncated, or not a safetensors file."""


class TensorFiles:
    """name -> memory-mapped numpy array, over all the tensor files of a directory."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        self._where: dict[str, tuple[pathlib.Path, int, dict]] = {}  # file, data start, entry
        for path in self._files():
            header, data_start = _header(path)
            for name, entry in header.items():
                if name != "__metadata__":
                    self._where[name] = (path, data_start, entry)

    def _files(self) -> list[pathlib.Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise TensorFileError(f"{index} is not a safetensors index ({error}).") from error
            files = sorted({self.directory / name for name in weight_map.values()})
            missing = [path.name for path in files if not path.is_file()]
            if missing:
                raise TensorFileError(f"{index} names tensor files that are not in "
                                      f"{self.directory}: {missing[:3]}; download them all.")
            return files
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise TensorFileError(f"{self.directory} has no *.safetensors files (weights in "
                                  f"other formats, e.g. pytorch_model.bin, are not read).")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][2]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor as a read-only map of its bytes in the file (no copy). The map closes
        when the array is dropped, so the pages read do not stay resident."""
        path, data_start, entry = self._where[name]
        start, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        if end == start:
            return np.zeros(entry["shape"], dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=data_start + start,
                         shape=tuple(entry["shape"]))


def _header(path: pathlib.Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file, checked against the file's size, and where its
    data starts."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(file.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise TensorFileError(f"{path} is not a safetensors file, or is truncated "
                              f"({error}); download it again.") from error
    end = max((entry["data_offsets"][1] for name, entry in header.items()
               if name != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise TensorFileError(f"{path} is truncated: its header describes "
                              f"{8 + length + end:,} bytes but the file has {size:,}; "
                              f"download it again.")
    unknown = {entry["dtype"] for name, entry in header.items()
               if name != "__metadata__" and entry["dtype"] not in DTYPES}
    if unknown:
        raise TensorFileError(f"{path} holds tensors of dtypes {sorted(unknown)}, which are "
                              f"not supported.")
    return header, 8 + length


def save(tensors: Iterable[tuple[str, np.ndarray]], out: pathlib.Path,
         max_shard_bytes: int) -> list[str]:
    """Writes the (name, array) pairs as model.safetensors, or as shards with an index past
    `max_shard_bytes`, a shard as soon as it is full (so only one is held at a time); returns
    the file names written."""
    from safetensors.flax import save_file

    written: list[tuple[pathlib.Path, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        path = out / f".shard-{len(written)}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, array in tensors:
        if shard and size + array.nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = np.ascontiguousarray(array)
        size += array.nbytes
        total += array.nbytes
    flush()
    if len(written) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
                 for i in range(len(written))]
    umask = os.umask(0)
    os.umask(umask)
    for name, (path, _) in zip(names, written):
        os.chmod(path, 0o666 & ~umask)  # the library writes 0600: a server may be another user
        path.rename(out / name)
    if len(written) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {key: name for name, (_, keys) in zip(names, written)
                                for key in keys}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        names.append(INDEX_FILE)
    return names
