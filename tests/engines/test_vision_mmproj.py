"""The start-up check of a configured `mmproj` (pure Python: no llama.cpp, no `gguf` package needed).

The GGUF files here are written by a 30-line writer in this module, so each test states exactly which
metadata or tensor is wrong.
"""

from __future__ import annotations

import struct
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tokentill.catalog import CatalogError, load_catalog
from tokentill.gguf import check_mmproj, read_header

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-mmproj.gguf"


def _string(value: str) -> bytes:
    data = value.encode()
    return struct.pack("<Q", len(data)) + data


def _value(value: Any) -> tuple[int, bytes]:
    if isinstance(value, bool):
        return 7, struct.pack("<?", value)
    if isinstance(value, int):
        return 4, struct.pack("<I", value)
    if isinstance(value, float):
        return 6, struct.pack("<f", value)
    if isinstance(value, str):
        return 8, _string(value)
    kind, _ = _value(value[0])
    return 9, struct.pack("<IQ", kind, len(value)) + b"".join(_value(v)[1] for v in value)


def write_gguf(path: Path, values: dict[str, Any], tensors: dict[str, tuple[int, ...]]) -> Path:
    """Header only (tensor data is never read by the check)."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(values))]
    for key, value in values.items():
        kind, data = _value(value)
        out += [_string(key), struct.pack("<I", kind), data]
    for name, shape in tensors.items():
        out += [_string(name), struct.pack("<I", len(shape)), *(struct.pack("<Q", d) for d in shape)]
        out.append(struct.pack("<IQ", 0, 0))
    path.write_bytes(b"".join(out))
    return path


def projector(**overrides: Any) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    values: dict[str, Any] = {
        "clip.has_vision_encoder": True,
        "clip.projector_type": "mlp",
        "clip.vision.embedding_length": 32,
        "clip.vision.feed_forward_length": 64,
        "clip.vision.block_count": 2,
        "clip.vision.attention.head_count": 2,
        "clip.vision.projection_dim": 576,
        "clip.vision.image_size": 256,
        "clip.vision.patch_size": 64,
        "clip.vision.attention.layer_norm_epsilon": 1e-5,
        "clip.vision.image_mean": [0.5, 0.5, 0.5],
        "clip.vision.image_std": [0.5, 0.5, 0.5],
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}, {"mm.2.weight": (128, 576)}


@pytest.fixture
def text_model(tmp_path: Path) -> Path:
    return write_gguf(
        tmp_path / "text.gguf", {"general.architecture": "llama", "llama.embedding_length": 576}, {}
    )


def test_the_committed_fixture_passes(text_model: Path) -> None:
    assert check_mmproj(FIXTURE, text_model) == "mlp"
    header = read_header(FIXTURE)
    assert header.tensors["mm.2.weight"] == (128, 576)


@pytest.mark.parametrize(
    ("overrides", "tensors", "message"),
    [
        ({"clip.has_vision_encoder": False}, None, "no vision encoder"),
        ({"clip.projector_type": None}, None, "names no projector type"),
        ({"clip.vision.patch_size": None}, None, "clip.vision.patch_size"),
        ({"clip.vision.image_mean": [0.5]}, None, "clip.vision.image_mean"),
        ({"clip.vision.attention.layer_norm_epsilon": None}, None, "layer_norm_epsilon"),
        ({"clip.vision.image_grid_pinpoints": [256, 256, 512]}, None, "even-length"),
        ({}, {"mm.0.weight": (32, 128)}, "needs the tensor mm.2.weight"),
        ({}, {"mm.2.weight": (128, 960)}, "width 960 but the text model"),
        ({"clip.projector_type": "idefics3", "clip.vision.projector.scale_factor": 1}, None, "scale_factor"),
    ],
)
def test_bad_projectors_are_named(
    tmp_path: Path, text_model: Path, overrides: dict[str, Any], tensors: Any, message: str
) -> None:
    values, default_tensors = projector(**overrides)
    path = write_gguf(tmp_path / "bad.gguf", values, tensors if tensors is not None else default_tensors)
    with pytest.raises(ValueError, match=message):
        check_mmproj(path, text_model)


def test_not_a_gguf_and_truncated(tmp_path: Path, text_model: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="bad magic"):
        check_mmproj(tmp_path / "x.gguf", text_model)
    (tmp_path / "t.gguf").write_bytes(FIXTURE.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated"):
        check_mmproj(tmp_path / "t.gguf", text_model)


def test_catalogue_refuses_a_bad_mmproj_naming_the_field(tmp_path: Path, text_model: Path) -> None:
    values, tensors = projector()
    bad = write_gguf(tmp_path / "wide.gguf", values, {"mm.2.weight": (128, 960)})
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nid = "v"\nweights = "{text_model}"\nmmproj = "{bad}"\n', encoding="utf-8")
    tomllib.loads(config.read_text())
    with pytest.raises(CatalogError, match=r"model 'v': mmproj: .*width 960"):
        load_catalog(config)
    config.write_text(
        f'[[models]]\nid = "v"\nweights = "{text_model}"\nmmproj = "{FIXTURE}"\n', encoding="utf-8"
    )
    assert load_catalog(config).get("v") is not None


def test_mmproj_is_only_for_the_embedded_engine(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nid = "e"\nengine = "echo"\nmmproj = "{FIXTURE}"\n', encoding="utf-8")
    with pytest.raises(CatalogError, match="mmproj: .*only used by engine 'llamacpp'"):
        load_catalog(config)
