"""Tables memory-mapped from safetensors files: a table larger than the RAM it is given.

:func:`create_mapped` makes a zero-filled safetensors file holding one tensor (the file is extended,
not written: the kernel reads unwritten pages as zeros) and maps it; :func:`map_tensor` maps a tensor
of an existing file. With ``writable`` the mapping is shared: writes go to the file, and the kernel
reads pages in and writes them back as memory allows. (Writing and reading whole files is
``safetensors.torch``'s: ``save_file`` writes from the tensors' own memory and ``load_file`` maps the
file, so neither holds a second copy of a large table.)

A mapped file cut shorter while it is mapped makes the next read of a page past its end a SIGBUS that
kills the process without a word. So a file is checked to hold the tensor before it is mapped, and
:func:`check_mapped` (called before every training step and evaluation batch) compares each mapped
file's size (through a descriptor of its own: the same file, even renamed) with what its mapping
needs: a truncated table is an :class:`EnvironmentFailure` naming the file, and the run is FAILED.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from pqa_core.errors import EnvironmentFailure

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


_mapped: dict = {}  # path -> (open descriptor of the mapped file, bytes its mapping needs)


def check_mapped() -> None:
    """Every mapped file still holds what its mapping reads, or one EnvironmentFailure naming the file."""
    for path, (fd, need) in list(_mapped.items()):
        size = os.fstat(fd).st_size
        if size < need:
            raise EnvironmentFailure(f"{path}: memory-mapped table cut to {size} bytes while the run used it "
                                     f"({need} needed); the run stops (its checkpoints are intact)")


def read_header(path) -> tuple:
    """``(header dict, byte offset of the data)`` of a safetensors file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return header, 8 + length


def map_tensor(path, name: str, writable: bool = False) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file, memory-mapped (shared with the file when ``writable``)."""
    header, data_start = read_header(path)
    entry = header[name]
    dtype = TORCH_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    if (data_start + begin) % torch.empty(0, dtype=dtype).element_size():
        raise ValueError(f"{path}: {name} does not start at a multiple of its element size; it cannot be mapped")
    size, need = os.path.getsize(path), data_start + end
    if size < need:
        raise EnvironmentFailure(f"{path}: {size} bytes, but tensor {name} needs {need}: the file is truncated")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if str(path) in _mapped:
        os.close(_mapped[str(path)][0])
    _mapped[str(path)] = (fd, need)
    storage = torch.UntypedStorage.from_file(str(path), shared=writable, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)[data_start + begin:data_start + end]
    return raw.view(dtype).view(entry["shape"])


def create_mapped(path, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """A new zero-filled safetensors file holding tensor ``name`` of ``shape`` and ``dtype``, mapped writable."""
    shape = [int(n) for n in shape]
    nbytes = torch.empty(0, dtype=dtype).element_size()
    for n in shape:
        nbytes *= n
    header = json.dumps({name: {"dtype": DTYPES[dtype], "shape": shape, "data_offsets": [0, nbytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        handle.truncate(8 + len(header) + nbytes)
    return map_tensor(path, name, writable=True)
