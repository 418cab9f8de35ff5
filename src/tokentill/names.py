"""What a name, label, model id or looked-up id given by an operator or a customer may hold.

One rule for the admin API, the CLI and the console, checked where the text enters a service: a name is
1 to N characters of printable Unicode without surrounding whitespace. Refused, as 400 `invalid_value`
naming the parameter:

* control, format, private-use, unassigned and surrogate code points (Unicode category C*): NUL, which
  PostgreSQL cannot store in text at all, the C0/C1 controls, `\\x1c`-`\\x1f` (which Python's `str.strip`
  counts as whitespace but a regex `\\S` does not), bidi overrides that make a name read as another;
* line and paragraph separators (U+2028, U+2029): a name is one line in listings and logs;
* whitespace at either end, and the empty string.

A looked-up name or id (from a URL path) only has to pass the character rule and a length cap: one that
passes but matches nothing is then a 404, as for any unknown id.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from tokentill.errors import InvalidRequest

__all__ = [
    "MAX_LABEL_CHARS",
    "MAX_LOOKUP_CHARS",
    "MAX_MODEL_ID_CHARS",
    "MAX_MODELS_PER_KEY",
    "MAX_NAME_CHARS",
    "check_label",
    "check_lookup",
    "check_models",
    "check_name",
    "name_problem",
]

MAX_NAME_CHARS = 64  # accounts.name
MAX_LABEL_CHARS = 128  # api_keys.name
MAX_MODEL_ID_CHARS = 128  # usage.model
MAX_MODELS_PER_KEY = 256
MAX_LOOKUP_CHARS = 256  # a longer path segment is refused, not echoed back whole

_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _bad_character(text: str) -> str | None:
    for char in text:
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            return f"U+{ord(char):04X}"
    return None


def name_problem(text: str, *, max_chars: int = MAX_NAME_CHARS) -> str | None:
    """Why `text` cannot be a name, as a phrase for an error message, or None when it can."""
    if not text:
        return "it is empty"
    if len(text) > max_chars:
        return f"it is longer than {max_chars} characters"
    bad = _bad_character(text)
    if bad is not None:
        return f"it holds the character {bad}, which is not printable"
    if text != text.strip():
        return "it starts or ends with whitespace"
    return None


def _refuse(param: str, problem: str, max_chars: int) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid '{param}': {problem}. Names are 1-{max_chars} characters, printable, without "
        "surrounding whitespace.",
        param=param,
    )


def check_name(text: str, *, param: str = "name", max_chars: int = MAX_NAME_CHARS) -> str:
    """`text` if it is a valid name, else `InvalidRequest` (400 `invalid_value`, `param`)."""
    problem = name_problem(text, max_chars=max_chars)
    if problem is not None:
        raise _refuse(param, problem, max_chars)
    return text


def check_label(text: str | None, *, param: str = "name") -> str | None:
    """A key's optional label: None, or a name of up to `MAX_LABEL_CHARS`."""
    return None if text is None else check_name(text, param=param, max_chars=MAX_LABEL_CHARS)


def check_models(models: Sequence[str] | None, *, param: str = "models") -> list[str] | None:
    """A key's model allow-list: None (every model) or 1 to `MAX_MODELS_PER_KEY` model ids, each a name
    of up to `MAX_MODEL_ID_CHARS`; duplicates are dropped, order kept."""
    if models is None:
        return None
    if not models:
        raise InvalidRequest(
            f"Invalid '{param}': give at least one model id, or leave it out (or null) for every model.",
            param=param,
        )
    for index, model in enumerate(models):
        check_name(model, param=f"{param}[{index}]", max_chars=MAX_MODEL_ID_CHARS)
    unique = list(dict.fromkeys(models))
    if len(unique) > MAX_MODELS_PER_KEY:
        raise InvalidRequest(
            f"Invalid '{param}': at most {MAX_MODELS_PER_KEY} model ids per key.", param=param
        )
    return unique


def check_lookup(text: str, *, param: str) -> str:
    """A name or id to look up (a URL path segment): the character rule and a length cap only."""
    if len(text) > MAX_LOOKUP_CHARS:
        raise InvalidRequest(
            f"Invalid '{param}': it is longer than {MAX_LOOKUP_CHARS} characters.", param=param
        )
    bad = _bad_character(text)
    if bad is not None:
        raise InvalidRequest(
            f"Invalid '{param}': it holds the character {bad}, which is not printable.", param=param
        )
    return text
