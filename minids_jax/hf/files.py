"""The tensors of a Hugging Face directory: one `*.safetensors` file, or a sharded set named by
`model.safetensors.index.json`, read one tensor at a time from memory maps.

Reading maps the files with numpy rather than using the `safetensors` library's numpy API,
which has no bfloat16 or float8 (the dtypes of the published files); `ml_dtypes` (a jax
dependency) supplies those. A tensor is a view of the mapped file until it is converted, so
only the pages it touches are read. Writing streams for the same reason: the library's
`save_file` serializes a whole file in memory (a 5 GB shard held twice beside the model), so a
tensor's bytes go to a spool file as it is made, and the shard is its header then the spool.
"""

from __future__ import annotations

import json
import pathlib
import shutil
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
DTYPE_NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}


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


class _Shard:
    """One safetensors file written a tensor at a time (see the module docstring)."""

    def __init__(self, path: pathlib.Path):
        self.path, self.spool_path = path, path.with_suffix(".spool")
        self.spool = open(self.spool_path, "wb")
        self.header: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                             "data_offsets": [self.size, self.size + array.nbytes]}
        self.spool.write(array.reshape(-1).view(np.uint8).data)  # (bfloat16 has no buffer)
        self.size += array.nbytes

    def close(self) -> None:
        self.spool.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        with open(self.path, "wb") as file, open(self.spool_path, "rb") as spool:
            file.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(spool, file, 16 << 20)
        self.spool_path.unlink()


def save(tensors: Iterable[tuple[str, np.ndarray]], out: pathlib.Path,
         max_shard_bytes: int) -> list[str]:
    """Writes the (name, array) pairs as model.safetensors, or as shards with an index past
    `max_shard_bytes`, each tensor to disk as it comes (only one is held at a time); returns
    the file names written."""
    written: list[_Shard] = []
    total = 0
    for name, array in tensors:
        if not written or (written[-1].header and
                           written[-1].size + array.nbytes > max_shard_bytes):
            if written:
                written[-1].close()
            written.append(_Shard(out / f".shard-{len(written)}.tmp"))
        written[-1].add(name, array)
        total += array.nbytes
    if not written:
        written.append(_Shard(out / ".shard-0.tmp"))
    written[-1].close()
    if len(written) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
                 for i in range(len(written))]
    for name, shard in zip(names, written):
        shard.path.rename(out / name)
    if len(written) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {key: name for name, shard in zip(names, written)
                                for key in shard.header}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        names.append(INDEX_FILE)
    return names
