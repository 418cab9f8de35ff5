"""Reading a GGUF file's header in pure Python, and the start-up check of a vision projector (`mmproj`).

Why this exists: libmtmd (llama.cpp's multimodal library) aborts the whole process on some malformed
projectors (a `GGML_ASSERT`, not an exception), so a configured `mmproj` is checked *before* any native
code sees it: `check_mmproj(mmproj, text_weights)` raises `ValueError` with a message naming the problem.
It reads metadata and tensor shapes only (a few hundred kB of a file at most), never tensor data, and it
bounds every count and length so that a corrupt or hostile file fails fast instead of exhausting memory.

What it checks (llama.cpp `tools/mtmd/clip.cpp`, `clip_model_loader`):
  * GGUF magic and version; `clip.has_vision_encoder` is true; a projector type is named;
  * the hyper-parameters clip.cpp reads unconditionally exist with the right types;
  * for the projectors whose output tensor we know (`mlp`, `idefics3`), that tensor exists and its width
    equals the text model's `<arch>.embedding_length` (libmtmd dereferences it without a check);
  * `idefics3` has `clip.vision.projector.scale_factor >= 2` (1 trips a GGML_ASSERT at encode time).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["GGUFHeader", "check_mmproj", "read_header", "text_embedding_length"]

_MAGIC = b"GGUF"
_MAX_KV = 100_000
_MAX_TENSORS = 1_000_000
_MAX_STRING = 16 * 1024 * 1024
_MAX_ARRAY = 50_000_000
_KEPT_ARRAY = 4096  # arrays up to this many elements are kept; longer ones are skipped (vocabularies)

# GGUF value types: id -> struct format of one element (strings and arrays handled separately).
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_UINT_TYPES = {0, 2, 4, 10}
_INT_TYPES = _UINT_TYPES | {1, 3, 5, 11}
_FLOAT_TYPES = {6, 12}


@dataclass
class GGUFHeader:
    """Metadata values (with their GGUF type ids) and tensor shapes (ggml `ne` order)."""

    values: dict[str, Any] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)


class _Reader:
    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh

    def read(self, n: int) -> bytes:
        data = self._fh.read(n)
        if len(data) != n:
            raise ValueError("the file ends inside its header (truncated or not a GGUF file)")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > _MAX_STRING:
            raise ValueError(f"a header string claims {length} bytes")
        return self.read(length).decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            elem, count = self.unpack("<I"), self.unpack("<Q")
            if count > _MAX_ARRAY:
                raise ValueError(f"a header array claims {count} elements")
            if elem in _SCALARS and count > _KEPT_ARRAY:
                self._fh.seek(struct.calcsize(_SCALARS[elem]) * count, 1)
                return _Skipped(count)
            items = [self.value(elem) for _ in range(count)]
            return items if count <= _KEPT_ARRAY else _Skipped(count)
        raise ValueError(f"unknown GGUF value type {kind}")


@dataclass(frozen=True)
class _Skipped:
    """A long array (a vocabulary, merges) whose elements were not kept."""

    count: int


def read_header(path: Path) -> GGUFHeader:
    """The metadata and tensor table of the GGUF at `path`; ValueError if it is not a readable GGUF."""
    header = GGUFHeader()
    with open(path, "rb") as fh:
        reader = _Reader(fh)
        if reader.read(4) != _MAGIC:
            raise ValueError("not a GGUF file (bad magic bytes)")
        version = reader.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = reader.unpack("<Q"), reader.unpack("<Q")
        if n_tensors > _MAX_TENSORS or n_kv > _MAX_KV:
            raise ValueError(f"implausible GGUF header ({n_tensors} tensors, {n_kv} keys)")
        for _ in range(n_kv):
            key = reader.string()
            kind = reader.unpack("<I")
            header.values[key] = reader.value(kind)
            header.types[key] = kind
        for _ in range(n_tensors):
            name = reader.string()
            n_dims = reader.unpack("<I")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            shape = tuple(int(reader.unpack("<Q")) for _ in range(n_dims))
            reader.unpack("<I")  # ggml type
            reader.unpack("<Q")  # data offset
            header.tensors[name] = shape
    return header


_REQUIRED_UINT = (
    "clip.vision.embedding_length",
    "clip.vision.feed_forward_length",
    "clip.vision.block_count",
    "clip.vision.attention.head_count",
    "clip.vision.projection_dim",
    "clip.vision.image_size",
    "clip.vision.patch_size",
)
# Projector type -> (tensor whose ne[1] is the output width) for the types we can check exactly.
_OUTPUT_TENSOR = {"mlp": "mm.2.weight", "idefics3": "mm.model.fc.weight"}


def text_embedding_length(header: GGUFHeader) -> int | None:
    arch = header.values.get("general.architecture")
    value = header.values.get(f"{arch}.embedding_length") if isinstance(arch, str) else None
    return int(value) if isinstance(value, int) else None


def check_mmproj(mmproj: Path, text_weights: Path) -> str:
    """Raise ValueError unless `mmproj` is a vision projector usable with `text_weights`; returns its type."""
    try:
        proj = read_header(mmproj)
    except OSError as exc:
        raise ValueError(f"cannot read {mmproj}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{mmproj} is not a valid projector GGUF: {exc}") from exc
    v, types = proj.values, proj.types
    if v.get("clip.has_vision_encoder") is not True:
        raise ValueError(f"{mmproj} has no vision encoder (clip.has_vision_encoder is not true)")
    kind = v.get("clip.projector_type") or v.get("clip.vision.projector_type")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{mmproj} names no projector type (clip.projector_type)")
    for key in _REQUIRED_UINT:
        if types.get(key) not in _INT_TYPES or int(v[key]) <= 0:
            raise ValueError(f"{mmproj} lacks a positive integer {key}")
    if types.get("clip.vision.attention.layer_norm_epsilon") not in _FLOAT_TYPES:
        raise ValueError(f"{mmproj} lacks clip.vision.attention.layer_norm_epsilon")
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        if not isinstance(v.get(key), list) or len(v[key]) < 3:
            raise ValueError(f"{mmproj} lacks {key} (an array of 3 floats)")
    pinpoints = v.get("clip.vision.image_grid_pinpoints")
    if pinpoints is not None and (not isinstance(pinpoints, list) or len(pinpoints) % 2):
        raise ValueError(f"{mmproj}: clip.vision.image_grid_pinpoints must be an even-length array")
    if kind == "idefics3":
        factor = v.get("clip.vision.projector.scale_factor")
        if not isinstance(factor, int) or factor < 2:
            raise ValueError(f"{mmproj}: idefics3 needs clip.vision.projector.scale_factor >= 2")
    output = _OUTPUT_TENSOR.get(kind)
    if output is None:
        return kind  # libmtmd compares the widths itself at load and fails cleanly
    shape = proj.tensors.get(output)
    if shape is None or len(shape) < 2:
        raise ValueError(f"{mmproj}: a {kind!r} projector needs the tensor {output}")
    try:
        text_width = text_embedding_length(read_header(text_weights))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the text model {text_weights}: {exc}") from exc
    if text_width is not None and shape[1] != text_width:
        raise ValueError(
            f"{mmproj} projects images to width {shape[1]} but the text model {text_weights.name} has "
            f"n_embd {text_width}: this projector belongs to another model"
        )
    return kind
