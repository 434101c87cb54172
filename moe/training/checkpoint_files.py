"""The files of a sharded checkpoint: per-rank safetensors files and a JSON index. No collectives here.

Every stored tensor is a *piece*: a contiguous range ``[offset, offset + numel)`` of a global
tensor's row-major flattened form, kept 1-D in the file of the rank that owns it. One form serves
every owner: an expert shard (rows ``[first, first + count)`` are one flat range), a whole
replicated tensor (offset 0), and a ZeRO partition's fragment of a parameter (any flat range). The
index (``index.json``) gives each global tensor its shape, dtype and pieces; loading reads only the
byte ranges it needs (with plain reads: the files are standard safetensors, whose header gives
each piece's place), so a checkpoint reshards to any world size,
expert-parallel size or ZeRO stage, and nothing is ever unpickled.

The writer streams each tensor's bytes to the file and hashes them on the way (no second read,
no serialised copy of the file in memory).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX = "index.json"
INDEX_FORMAT = "dynamoe-sharded-1"

# safetensors' dtype names for the dtypes a checkpoint holds.
_ST_DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in _ST_DTYPES}


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _ST_DTYPES:
        raise TypeError(f"checkpoints hold no {dtype} tensors")
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Piece:
    """``tensor`` (1-D) is ``[offset, offset + tensor.numel())`` of the flattened global tensor ``key``."""

    key: str
    offset: int
    tensor: torch.Tensor


def write_pieces(path: Path, pieces: list[Piece], metadata: dict[str, str] | None = None) -> dict:
    """Write ``pieces`` as one safetensors file, each under its key; returns ``{"bytes", "sha256"}``.

    Tensors go to the file one at a time straight from their memory (a CUDA tensor is copied to
    the host alone), so writing adds at most one tensor to the memory in use.
    """
    header: dict = {"__metadata__": dict(metadata or {})}
    begin = 0
    for piece in pieces:
        if piece.key in header:
            raise ValueError(f"two pieces of {piece.key} in one file")
        nbytes = piece.tensor.numel() * piece.tensor.element_size()
        header[piece.key] = {
            "dtype": _ST_DTYPES[piece.tensor.dtype],
            "shape": [piece.tensor.numel()],
            "data_offsets": [begin, begin + nbytes],
        }
        begin += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    h = hashlib.sha256()
    size = 0
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(encoded)), encoded):
            f.write(chunk)
            h.update(chunk)
            size += len(chunk)
        for piece in pieces:
            flat = piece.tensor.detach().reshape(-1)
            if flat.device.type != "cpu":
                flat = flat.cpu()
            view = memoryview(flat.contiguous().view(torch.uint8).numpy())
            f.write(view)
            h.update(view)
            size += view.nbytes
    return {"bytes": size, "sha256": h.hexdigest()}


def build_index(
    metas: dict[str, dict], placed: list[tuple[str, str, int, int]], aliases: dict[str, str], info: dict
) -> dict:
    """The index: ``metas`` {key: {"shape", "dtype"}}, ``placed`` [(file, key, offset, numel)],
    ``aliases`` {key: key it shares storage with} (tied weights), ``info`` (world size and such).
    Raises ValueError when the pieces do not tile every tensor exactly once."""
    tensors = {key: {"shape": list(m["shape"]), "dtype": m["dtype"], "pieces": []} for key, m in sorted(metas.items())}
    for file, key, offset, numel in placed:
        if key not in tensors:
            raise ValueError(f"a piece of {key}, which no rank described")
        tensors[key]["pieces"].append([file, offset, numel])
    for key, entry in tensors.items():
        entry["pieces"].sort(key=lambda p: p[1])
        check_tiling(key, entry)
    for alias, target in aliases.items():
        if target not in tensors:
            raise ValueError(f"{alias} is tied to {target}, which is not in the checkpoint")
    return {"format": INDEX_FORMAT, **info, "tensors": tensors, "aliases": dict(sorted(aliases.items()))}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def check_tiling(key: str, entry: dict) -> None:
    """The pieces of ``key`` (sorted by offset) cover its elements exactly once."""
    at = 0
    for _, offset, numel in entry["pieces"]:
        if offset != at:
            what = "gap" if offset > at else "overlap"
            raise ValueError(f"{key}: a {what} at element {min(at, offset)} between its stored pieces")
        at = offset + numel
    if at != _numel(entry["shape"]):
        raise ValueError(f"{key}: its pieces hold {at} of its {_numel(entry['shape'])} elements")


class ShardedReader:
    """Reads ranges of the global tensors of a checkpoint folder through its index; check the
    folder against its manifest first (``checkpoint.verify_checkpoint``)."""

    def __init__(self, folder: Path, index: dict | None = None):
        from dynamoe.training.checkpoint import CheckpointError

        self.folder = Path(folder)
        self._error = CheckpointError
        if index is None:
            try:
                index = json.loads((self.folder / INDEX).read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(
                    f"checkpoint '{folder}': {INDEX} is unreadable ({err}); fix: resume from an earlier checkpoint"
                ) from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise CheckpointError(
                f"checkpoint '{folder}': {INDEX} is not a dynamoe sharded index (format "
                f"{index.get('format') if isinstance(index, dict) else None!r}); fix: resume from an earlier checkpoint"
            )
        self.index = index
        self.tensors: dict = index["tensors"]
        self.aliases: dict = index.get("aliases", {})
        for key, entry in self.tensors.items():
            if entry.get("dtype") not in _DTYPE_NAMES:
                raise CheckpointError(f"checkpoint '{folder}': {key} has an unknown dtype {entry.get('dtype')!r}")
            try:
                check_tiling(key, entry)
            except ValueError as err:
                raise CheckpointError(
                    f"checkpoint '{folder}' is incomplete ({err}); fix: resume from an earlier checkpoint"
                ) from None
        self._open: dict = {}

    def files(self) -> set[str]:
        return {p[0] for entry in self.tensors.values() for p in entry["pieces"]}

    def close(self) -> None:
        for f, _, _ in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _entry(self, key: str) -> dict:
        key = self.aliases.get(key, key)
        if key not in self.tensors:
            raise self._error(f"checkpoint '{self.folder}' has no tensor {key}")
        return self.tensors[key]

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in (*self.tensors, *self.aliases) if k.startswith(prefix))

    def __contains__(self, key: str) -> bool:
        return key in self.tensors or key in self.aliases

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPE_NAMES[self._entry(key)["dtype"]]

    def _header(self, name: str) -> tuple:
        """(open file, data start, {key: (dtype name, begin, end)}) of a safetensors file."""
        if name not in self._open:
            path = self.folder / name
            try:
                f = open(path, "rb")  # kept open for the next reads; close() closes it
                (length,) = struct.unpack("<Q", f.read(8))
                if length > path.stat().st_size:
                    raise ValueError(f"a header of {length} bytes in a file of {path.stat().st_size}")
                header = json.loads(f.read(length))
                entries = {k: (v["dtype"], *v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}
            except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
                raise self._error(
                    f"checkpoint '{self.folder}': {name} cannot be read ({err}); fix: resume from an earlier checkpoint"
                ) from None
            self._open[name] = (f, 8 + length, entries)
        return self._open[name]

    def read(self, key: str, start: int = 0, numel: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the flattened tensor ``key`` (1-D); only the
        bytes of that range are read (no memory map, no whole-file buffer). ``out`` (a tensor of
        ``numel`` elements, contiguous on the host, of the stored dtype) receives them in place."""
        entry = self._entry(key)
        total = _numel(entry["shape"])
        numel = total - start if numel is None else numel
        if start < 0 or numel < 0 or start + numel > total:
            raise self._error(f"checkpoint '{self.folder}': elements [{start}, {start + numel}) of {key} ({total})")
        dtype = _DTYPE_NAMES[entry["dtype"]]
        if out is None:
            out = torch.empty(numel, dtype=dtype)
        elif not self.fits(key, out) or out.numel() != numel:
            raise ValueError(f"{key}: cannot read {numel} elements into a {out.dtype} tensor of {out.numel()}")
        out = out.detach().view(-1)  # filled through its bytes, outside autograd
        size = out.element_size()
        raw = out.view(torch.uint8).numpy() if numel else None
        end = start + numel
        stored_key = self.aliases.get(key, key)
        for file, offset, count in entry["pieces"]:
            a, b = max(start, offset), min(end, offset + count)
            if a >= b:
                continue
            f, data_start, entries = self._header(file)
            stored = entries.get(stored_key)
            if stored is None or stored[0] != _ST_DTYPES[out.dtype] or stored[2] - stored[1] != count * size:
                raise self._error(
                    f"checkpoint '{self.folder}': {file} does not hold {stored_key} as {INDEX} says "
                    f"({_ST_DTYPES[out.dtype]} x {count}); fix: resume from an earlier checkpoint"
                )
            f.seek(data_start + stored[1] + (a - offset) * size)
            got = f.readinto(memoryview(raw[(a - start) * size : (b - start) * size]))
            if got != (b - a) * size:
                raise self._error(
                    f"checkpoint '{self.folder}': {file} ends inside {stored_key}; "
                    "fix: resume from an earlier checkpoint"
                )
        return out

    def fits(self, key: str, t: torch.Tensor) -> bool:
        """``t`` can receive ``key``'s elements in place (:meth:`read`'s ``out``)."""
        return t.device.type == "cpu" and t.is_contiguous() and t.dtype == self.dtype(key)

    def read_rows(self, key: str, first: int, count: int) -> torch.Tensor:
        """Rows ``[first, first + count)`` along the first dimension, shaped."""
        shape = self.shape(key)
        row = _numel(shape[1:])
        return self.read(key, first * row, count * row).view(count, *shape[1:])

    def read_full(self, key: str) -> torch.Tensor:
        return self.read(key).view(self.shape(key))
