"""Sparse weights stored as sparse data inside ordinary safetensors files.

Every tensor is written in whichever of three encodings is smallest:
- `dense`: as it is;
- `bitmask`: a packed bit per element (little-endian bit order) marking the non-zeros, plus the
  non-zero values in row-major order: ceil(n / 8) + nnz * itemsize bytes;
- `csr`: per row (all leading dimensions flattened) int32 row pointers, column indices in int16 when
  the last dimension allows it (else int32), and the values: 4 * (rows + 1) + nnz * (2 or 4 + itemsize).
Then every stored array (values, indices, masks, dense tensors) goes through a lossless entropy stage
when that makes it smaller: its bytes are split into planes (byte 0 of every element, byte 1, ...) and
each plane is compressed with Zstandard where that pays, else kept raw (the Blosc "shuffle" idea: the
sign/exponent bytes of trained weights are highly repetitive, low mantissa bytes are not). The packed
array is stored as uint8 under the same name.
Tensors that share storage (tied embeddings) are written once. The choice of encoding, the plane layout
and each tensor's shape and dtype are kept in the file's metadata under `sparse_expansion.index`, so a
file is self-describing; decoding restores the exact dense tensors (bit for bit).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import UsageError
from ..settings import OneOf

INDEX_KEY = "sparse_expansion.index"
COMPRESSED_WEIGHTS_FILE = "model.compressed.safetensors"
MIN_ELEMENTS = 1024  # smaller tensors (norms, biases) are not worth an index entry of their own
ZSTD_LEVEL = 1  # on pruned SmolLM2 level 1 was both the smallest and the fastest of 1, 3 and 9 (BENCHMARKS.md)
MIN_PLANE_GAIN = 0.97  # keep a compressed plane only when it is at least 3% smaller


def _pack(tensor: torch.Tensor) -> tuple[torch.Tensor, list[list]] | None:
    """Byte planes, each Zstandard-compressed where that pays; None when nothing is gained."""
    raw = tensor.contiguous().view(torch.uint8).numpy().reshape(tensor.numel(), tensor.element_size())
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    pieces, layout = [], []
    for plane in raw.T:
        data = np.ascontiguousarray(plane).tobytes()
        packed = compressor.compress(data)
        if len(packed) < MIN_PLANE_GAIN * len(data):
            pieces.append(packed)
            layout.append(["zstd", len(packed)])
        else:
            pieces.append(data)
            layout.append(["raw", len(data)])
    if all(codec == "raw" for codec, _ in layout):
        return None
    return torch.frombuffer(bytearray(b"".join(pieces)), dtype=torch.uint8), layout


def _unpack(packed: torch.Tensor, layout: list[list], dtype: torch.dtype, count: int) -> torch.Tensor:
    data = memoryview(packed.numpy())
    itemsize = torch.empty(0, dtype=dtype).element_size()
    planes = np.empty((itemsize, count), dtype=np.uint8)
    decompressor = zstandard.ZstdDecompressor()
    offset = 0
    for plane, (codec, size) in enumerate(layout):
        chunk = data[offset:offset + size]
        offset += size
        planes[plane] = np.frombuffer(decompressor.decompress(chunk, max_output_size=count) if codec == "zstd"
                                      else chunk, dtype=np.uint8)
    # planes[i] holds byte i of every element: a byte transpose puts the elements back together.
    return torch.from_numpy(planes).t().contiguous().view(dtype).reshape(-1)


def _csr_index_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32


def encoded_sizes(tensor: torch.Tensor) -> dict[str, int]:
    """Bytes each applicable encoding would take for this tensor."""
    n, item = tensor.numel(), tensor.element_size()
    sizes = {"dense": n * item}
    if tensor.dim() >= 2 and tensor.is_floating_point() and n >= MIN_ELEMENTS:
        nnz = int(torch.count_nonzero(tensor))
        cols = tensor.shape[-1]
        sizes["bitmask"] = (n + 7) // 8 + nnz * item
        if nnz < torch.iinfo(torch.int32).max:
            index_bytes = 2 if _csr_index_dtype(cols) == torch.int16 else 4
            sizes["csr"] = 4 * (n // cols + 1) + nnz * (index_bytes + item)
    return sizes


WEIGHT_FORMATS = ("auto", "compressed", "dense")
WEIGHT_FORMAT = OneOf(WEIGHT_FORMATS)  # the check of a `format` setting
# weight format -> (encodings allowed per tensor, entropy-coded byte planes)
ENCODINGS = {"compressed": (("dense", "bitmask", "csr"), True), "dense": (("dense",), False)}


def resolve_weight_format(state: dict[str, torch.Tensor], requested: str) -> str:
    """`dense` or `compressed`; `auto` picks compressed whenever that is smaller than dense."""
    WEIGHT_FORMAT("format", requested)
    if requested != "auto":
        return requested
    sizes = [encoded_sizes(t) for t in state.values()]
    return "compressed" if sum(min(x.values()) for x in sizes) < sum(x["dense"] for x in sizes) else "dense"


def _encode(name: str, tensor: torch.Tensor, encoding: str) -> dict[str, torch.Tensor]:
    flat = tensor.detach().contiguous().cpu()
    if encoding == "dense":
        return {name: flat}
    nonzero = flat != 0
    values = flat[nonzero]
    if encoding == "bitmask":
        bits = np.packbits(nonzero.numpy().reshape(-1), bitorder="little")
        return {f"{name}::mask": torch.from_numpy(bits), f"{name}::values": values}
    cols = flat.shape[-1]
    rows2d = nonzero.reshape(-1, cols)
    counts = rows2d.sum(1, dtype=torch.int64)
    crow = torch.zeros(rows2d.shape[0] + 1, dtype=torch.int64)
    crow[1:] = counts.cumsum(0)
    col = rows2d.nonzero()[:, 1].to(_csr_index_dtype(cols))
    return {f"{name}::crow": crow.to(torch.int32), f"{name}::col": col, f"{name}::values": values}


@dataclass(frozen=True)
class BitmaskTensor:
    """A tensor as the file stores it in the `bitmask` encoding, not decoded: `mask` (uint8, one bit per element
    of the row-major tensor, little-endian bit order) and `values` (the non-zeros in row-major order)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    mask: torch.Tensor
    values: torch.Tensor


def _decode(name: str, entry: dict, read, keep_bitmask: bool = False) -> torch.Tensor | BitmaskTensor:
    encoding = entry["encoding"]
    shape = entry["shape"]
    if encoding == "dense":
        return read(name)
    dtype = getattr(torch, entry["dtype"])
    values = read(f"{name}::values")
    numel = int(np.prod(shape)) if shape else 1
    if encoding == "bitmask" and keep_bitmask:
        return BitmaskTensor(tuple(shape), dtype, read(f"{name}::mask"), values)
    if encoding == "bitmask":
        bits = read(f"{name}::mask").numpy()
        mask = torch.from_numpy(np.unpackbits(bits, count=numel, bitorder="little").view(bool))
        return torch.zeros(numel, dtype=dtype).masked_scatter_(mask, values).reshape(shape)
    if encoding == "csr":
        crow = read(f"{name}::crow").to(torch.int64)
        col = read(f"{name}::col").to(torch.int64)
        cols = shape[-1]
        rows = numel // cols
        row_ids = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
        dense = torch.zeros(rows, cols, dtype=dtype)
        dense[row_ids, col] = values
        return dense.reshape(shape)
    raise UsageError(f"unknown encoding {encoding!r} for tensor {name}")


def save_compressed(state: dict[str, torch.Tensor], path: str | Path,
                    allow: tuple[str, ...] = ("dense", "bitmask", "csr"), pack: bool = True) -> dict:
    """Write `state` with the smallest allowed encoding per tensor; returns the index (name -> entry).
    `pack=False` skips the entropy stage (every array stored as it is)."""
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            index[name] = {"encoding": "alias", "target": seen[key]}
            continue
        seen[key] = name
        sizes = {k: v for k, v in encoded_sizes(tensor).items() if k in allow or k == "dense"}
        encoding = min(sizes, key=lambda k: (sizes[k], k != "dense"))
        index[name] = {"encoding": encoding, "shape": list(tensor.shape), "dtype": str(tensor.dtype).split(".")[-1],
                       "bytes": sizes[encoding], "dense_bytes": sizes["dense"]}
        packing, stored = {}, 0
        for key, array in _encode(name, tensor, encoding).items():
            packed = _pack(array) if pack and array.numel() >= MIN_ELEMENTS else None
            if packed is not None and packed[0].numel() < array.numel() * array.element_size():
                packing[key] = {"planes": packed[1], "dtype": str(array.dtype).split(".")[-1], "count": array.numel(),
                                "shape": list(array.shape)}
                array = packed[0]
            tensors[key] = array
            stored += array.numel() * array.element_size()
        if packing:
            index[name]["packed"] = packing
        index[name]["bytes"] = stored
    # One metadata entry: safetensors writes several in a different order in every process, and the same
    # tensors must give the same bytes (a resumed build is checked file for file against an uninterrupted one).
    save_file(tensors, str(path), metadata={INDEX_KEY: json.dumps(index, separators=(",", ":"))})
    return index


def is_compressed_file(path: str | Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return INDEX_KEY in (handle.metadata() or {})
    except (SafetensorError, OSError):
        return False


def _reader(handle, packing: dict):
    def read(key: str) -> torch.Tensor:
        tensor = handle.get_tensor(key)
        if key not in packing:
            # A copy of its own: the tensor safetensors hands out shares the mapping of the whole file, which
            # would stay resident as long as any one tensor of the file lives (1.4 GiB of a 16-expert model's
            # files behind its small attention weights, once its experts are held compressed).
            return tensor.clone()
        meta = packing[key]
        return _unpack(tensor, meta["planes"], getattr(torch, meta["dtype"]), meta["count"]).reshape(meta["shape"])

    return read


def compressed_names(path: str | Path) -> list[str]:
    """The tensor names a `save_compressed` file holds (its header only)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"{path} is corrupted or truncated: {str(exc).splitlines()[0]}") from None
    if INDEX_KEY not in metadata:
        raise UsageError(f"{path} has no {INDEX_KEY} entry: not written by sparse-expansion")
    return list(json.loads(metadata[INDEX_KEY]))


def load_compressed(path: str | Path, select: Callable[[str], bool] | None = None,
                    keep_bitmask: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Read a file written by `save_compressed` back into dense tensors (exactly as saved); `select`: only the
    tensors whose name it accepts (the others are not read); `keep_bitmask`: the tensors whose name it accepts
    come back as `BitmaskTensor` where the file stores them as bitmasks (never decoded to dense)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if INDEX_KEY not in metadata:
                raise UsageError(f"{path} has no {INDEX_KEY} entry: not written by sparse-expansion")
            index = json.loads(metadata[INDEX_KEY])
            if select is not None:
                full = index
                index = {name: entry for name, entry in full.items() if select(name)}
                for entry in list(index.values()):  # a selected alias needs its target
                    if entry["encoding"] == "alias":
                        index.setdefault(entry["target"], full[entry["target"]])
            state = {name: _decode(name, entry, _reader(handle, entry.get("packed", {})),
                                   keep_bitmask is not None and keep_bitmask(name))
                     for name, entry in index.items() if entry["encoding"] != "alias"}
    except (SafetensorError, zstandard.ZstdError, ValueError) as exc:
        raise UsageError(f"{path} is corrupted or truncated: {str(exc).splitlines()[0]}") from None
    for name, entry in index.items():
        if entry["encoding"] == "alias":
            state[name] = state[entry["target"]]
    return state
