"""The catalogue file: every mistake stops start-up with a message naming the model and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokentill.catalog import CatalogError, load_catalog

ECHO = '[[models]]\nid = "a"\nengine = "echo"\n'


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (ECHO + "colour = 3\n", ["'a'", "colour", "Extra inputs are not permitted"]),
        (ECHO + 'price_input = "x"\n', ["'a'", "price_input", "valid integer"]),
        (ECHO + "price_output = -1\n", ["'a'", "price_output", "greater than or equal to 0"]),
        (ECHO + "price_output = 10000000000\n", ["'a'", "price_output", "less than or equal to"]),
        (ECHO + "context = 16\n", ["'a'", "context"]),
        (ECHO + 'engine = "vllm"\n', ["not valid TOML"]),  # a key given twice
        ('[[models]]\nid = "a"\nengine = "vllm"\n', ["'a'", "engine", "'llamacpp', 'upstream' or 'echo'"]),
        ('[[models]]\nid = "a"\nweights = "/no/m.gguf"\n', ["'a'", "weights", "not found: /no/m.gguf"]),
        ('[[models]]\nid = "bad id!"\nengine = "echo"\n', ["id", "pattern"]),
        (ECHO + ECHO, ["duplicate model id", "a"]),
        ("[[models]\nid = 1", ["not valid TOML"]),
        ('[[model]]\nid = "a"\n', ["unknown top-level key", "model"]),
        ("", ["at least one [[models]]"]),
        ("models = [1]\n", ["#0"]),
    ],
)
def test_invalid_catalogue_names_the_problem(tmp_path: Path, text: str, named: list[str]) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert str(path) in message
    for part in named:
        assert part in message, message


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="file not found"):
        load_catalog(tmp_path / "missing.toml")
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path)  # a folder
    binary = tmp_path / "models.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CatalogError, match="not UTF-8"):
        load_catalog(binary)


def test_valid_catalogue_and_builtin(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(ECHO + 'price_input = 1\nprice_output = 2\n[[models]]\nid = "b"\nengine = "echo"\n')
    catalog = load_catalog(path)
    assert [m.id for m in catalog] == ["a", "b"]
    a = catalog.get("a")
    assert a is not None and (a.price_input, a.price_output) == (1, 2)
    builtin = load_catalog(None).get("o1-preview")
    assert builtin is not None and (builtin.price_input, builtin.price_output) == (15, 60)
