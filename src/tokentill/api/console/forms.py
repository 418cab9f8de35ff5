"""HTML form bodies (`application/x-www-form-urlencoded`) and the checks of their fields.

Every refusal is `InvalidRequest` (400) naming the field, so the console shows it next to the form, just
as the JSON API would answer it. No multipart: the console uploads nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs

from tokentill.errors import InvalidRequest
from tokentill.names import check_name
from tokentill.settings import parse_credits

__all__ = ["MAX_FORM_BYTES", "Form", "credits_field", "limit_field", "name_field"]

MAX_FORM_BYTES = 64 * 1024
_MAX_FIELDS = 100
_MAX_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Form:
    values: Mapping[str, list[str]]

    @classmethod
    def parse(cls, body: bytes) -> Form:
        if len(body) > MAX_FORM_BYTES:
            raise InvalidRequest("The form is too large.", param="form")
        try:
            text = body.decode("utf-8")
            values = parse_qs(text, keep_blank_values=True, strict_parsing=False, max_num_fields=_MAX_FIELDS)
        except (UnicodeDecodeError, ValueError):
            raise InvalidRequest("The form could not be read.", param="form") from None
        return cls(values)

    def one(self, name: str) -> str:
        """The field's first value, blanks around removed; "" when absent."""
        return self.values.get(name, [""])[0].strip()

    def many(self, name: str) -> list[str]:
        return [v.strip() for v in self.values.get(name, []) if v.strip()]


def name_field(text: str, param: str, *, required: bool) -> str | None:
    """A name or label, by the rule every entry point shares (`tokentill.names.check_name`: 1-64
    printable characters without surrounding whitespace); "" → None unless `required`."""
    if not text:
        if required:
            raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
        return None
    return check_name(text, param=param)


def credits_field(text: str, param: str = "credits", *, allow_zero: bool = False) -> int:
    """Decimal credits → µcr, more than 0 (or 0 too, where "" means 0, with `allow_zero`)."""
    if allow_zero and not text:
        return 0
    try:
        amount = parse_credits(text)
    except ValueError as exc:
        raise InvalidRequest(f"Invalid '{param}': {exc}.", param=param) from None
    if amount < 0 or (amount == 0 and not allow_zero):
        raise InvalidRequest(f"Invalid '{param}': give more than 0 credits.", param=param)
    return amount


def limit_field(text: str, param: str, *, maximum: int = _MAX_LIMIT) -> int | None:
    """A positive whole number up to `maximum`; "" → None (no limit)."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or not 1 <= int(text) <= maximum:
        raise InvalidRequest(f"Invalid '{param}': give a whole number from 1 to {maximum}.", param=param)
    return int(text)
