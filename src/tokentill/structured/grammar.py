"""JSON Schema → llama.cpp GBNF, validating as it compiles.

`GrammarBuilder.schema(schema, param)` returns the name of a rule that matches exactly the JSON texts the
schema accepts (within the subset below), so output sampled under the grammar parses and validates. Every
keyword outside the subset raises `InvalidRequest` with code `invalid_json_schema` and `param` set to the
JSON path of the keyword (`response_format.json_schema.schema.properties.age.pattern`): a schema the
grammar cannot enforce is refused, never silently loosened.

Subset: `type` (one or a list), `enum`, `const`, `anyOf`, `allOf` with one member, `$ref` to `#`, `#/$defs/…`
or `#/definitions/…` (recursion allowed); objects with `properties`, `required`, `additionalProperties`
(false, true or a schema; with `properties` only the declared ones are generated); arrays with `items`,
`minItems`, `maxItems`; strings with `minLength`, `maxLength`, `format` (date, time, date-time, uuid);
integers with `minimum` 0 or 1; annotations (`title`, `description`, `default`, `examples`, …) ignored.

Layout of the text: compact JSON, one optional space after `:` and `,`, nothing else: a grammar that
admits unbounded whitespace lets a small model loop on newlines until its budget runs out. Numbers have
bounded digits, and the keys of free-form objects (json_object, untyped values) at most 64 characters,
for the same reason. Objects list required properties first (in schema order), then the
optional ones in schema order, each optional.
"""

from __future__ import annotations

import json
from typing import Any

from tokentill.errors import InvalidRequest

__all__ = ["GrammarBuilder", "gbnf_literal", "json_object_grammar", "schema_grammar"]

MAX_REPEAT = 1000  # largest minItems/maxItems/minLength/maxLength the grammar spells out
MAX_RULES = 2000  # rules one grammar may hold (a schema that large is refused, not compiled for minutes)

_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$comment", "$schema", "$id", "deprecated",
     "readOnly", "writeOnly", "$defs", "definitions", "strict"}
)  # fmt: skip
_TYPE_KEYWORDS: dict[str, frozenset[str]] = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength", "format"}),
    "integer": frozenset({"minimum"}),
    "number": frozenset(),
    "boolean": frozenset(),
    "null": frozenset(),
}
_COMMON = frozenset({"type", "enum", "const", "anyOf", "allOf", "$ref"})

_BASE_RULES = {
    "sp": '" "?',
    "char": r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": r'"\"" char* "\""',
    "integer": '"-"? ("0" | [1-9] [0-9]{0,15})',
    "number": 'integer ("." [0-9]{1,15})? ([eE] [-+]? [0-9]{1,3})?',
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "key": r'"\"" char{0,64} "\""',
    "object": '"{" ( key ":" sp value ( "," sp key ":" sp value )* )? "}"',
    "array": '"[" ( value ( "," sp value )* )? "]"',
}
_FORMATS = {
    "date": r'"\"" date-body "\""',
    "time": r'"\"" time-body "\""',
    "date-time": r'"\"" date-body "T" time-body "\""',
    "uuid": r'"\"" [0-9a-f]{8} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{12} "\""',
}  # fmt: skip
_TIME_BODY = (
    '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? '
    '("Z" | [-+] [0-9]{2} ":" [0-9]{2})'
)
_DATE_BODY = '[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])'


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _json_text(value: Any, param: str = "") -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN / Infinity, which json.loads accepts but JSON does not have
        raise _refuse(param, "NaN and Infinity are not JSON values.") from None


def _refuse(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid schema for '{param}': {what}", code="invalid_json_schema", param=param)


class GrammarBuilder:
    """Collects GBNF rules; `schema` compiles one schema document, `render` writes the grammar."""

    def __init__(self) -> None:
        self._rules: dict[str, str] = {}
        self._refs: dict[tuple[int, str], str] = {}
        self._documents: list[Any] = []  # keeps each compiled document alive (ids key `_refs`)
        # References being compiled since the last `{` or `[`: meeting one again would be left recursion,
        # a grammar llama.cpp cannot run (`{"$defs": {"A": {"$ref": "#/$defs/A"}}}`).
        self._head: set[tuple[int, str]] = set()

    def rule(self, name: str, body: str) -> str:
        """Add (or replace) rule `name`; returns the name."""
        self._rules[name] = body
        if len(self._rules) > MAX_RULES:
            raise InvalidRequest(
                f"The schema is too large: it needs more than {MAX_RULES} grammar rules.",
                code="invalid_json_schema",
            )
        return name

    def fresh(self, hint: str) -> str:
        base = "".join(c if c.isalnum() else "-" for c in hint).strip("-").lower() or "r"
        name, n = base, 1
        while name in self._rules or name in _BASE_RULES or name in {"time-body", "date-body", "key"}:
            n += 1
            name = f"{base}-{n}"
        self._rules[name] = ""  # reserved (recursive references may name it before its body exists)
        return name

    def schema(self, schema: Any, param: str) -> str:
        """The rule matching `schema` (a whole document: `$ref`s resolve against it)."""
        self._documents.append(schema)
        try:
            return self._compile(schema, param, schema, param, "root-value")
        except RecursionError:
            raise _refuse(param, "the schema is nested too deeply.") from None

    def render(self, root_body: str) -> str:
        """The grammar text: `root` first, then the collected rules and the shared base rules."""
        rules = {"root": root_body, **{k: v for k, v in self._rules.items() if v}, **_BASE_RULES}
        rules["time-body"], rules["date-body"] = _TIME_BODY, _DATE_BODY
        return "\n".join(f"{name} ::= {body}" for name, body in rules.items()) + "\n"

    # --- compiling ---------------------------------------------------------------------------------------

    def _compile(self, schema: Any, param: str, doc: Any, doc_param: str, hint: str) -> str:
        if schema is True:
            return "value"
        if not isinstance(schema, dict):
            raise _refuse(param, "a schema must be an object (or true).")
        unknown = [k for k in schema if k not in _COMMON and k not in _ANNOTATIONS]
        types = self._types(schema, param)
        allowed = frozenset().union(*(_TYPE_KEYWORDS[t] for t in types)) if types else frozenset()
        if not types:  # keywords of any type are fine when the type is implied (properties → object)
            allowed = frozenset().union(*_TYPE_KEYWORDS.values())
        for key in unknown:
            if key not in allowed:
                raise _refuse(f"{param}.{key}", f"the keyword '{key}' is not supported here.")
        if "$ref" in schema:
            others = [k for k in schema if k not in _ANNOTATIONS and k != "$ref"]
            if others:
                raise _refuse(f"{param}.{others[0]}", "'$ref' cannot be combined with other keywords.")
            return self._ref(schema["$ref"], f"{param}.$ref", doc, doc_param)
        if "const" in schema:
            return self.rule(self.fresh(hint), gbnf_literal(_json_text(schema["const"], f"{param}.const")))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise _refuse(f"{param}.enum", "'enum' must be a non-empty array.")
            body = " | ".join(gbnf_literal(_json_text(v, f"{param}.enum")) for v in values)
            return self.rule(self.fresh(hint), body)
        if "anyOf" in schema or "allOf" in schema:
            key = "anyOf" if "anyOf" in schema else "allOf"
            members = schema[key]
            if not isinstance(members, list) or not members:
                raise _refuse(f"{param}.{key}", f"'{key}' must be a non-empty array.")
            if key == "allOf" and len(members) != 1:
                raise _refuse(f"{param}.allOf", "'allOf' is supported with one member only.")
            if types or any(k in schema for k in allowed):
                raise _refuse(f"{param}.{key}", f"'{key}' cannot be combined with 'type' or its keywords.")
            names = [
                self._compile(m, f"{param}.{key}[{i}]", doc, doc_param, f"{hint}-{i}")
                for i, m in enumerate(members)
            ]
            return self.rule(self.fresh(hint), " | ".join(names))
        if not types:  # the keywords name the type (a value of another type would skip them, but the
            # grammar generates the type they describe, so they are enforced rather than dodged)
            implied = [t for t in ("object", "array", "string") if _TYPE_KEYWORDS[t] & schema.keys()]
            if not implied:
                if "minimum" in schema:
                    raise _refuse(f"{param}.minimum", "'minimum' needs 'type': 'integer'.")
                return "value"
            if len(implied) > 1:
                raise _refuse(param, f"keywords of several types ({', '.join(implied)}) without 'type'.")
            types = implied
        names = [self._typed(t, schema, param, doc, doc_param, hint) for t in types]
        return names[0] if len(names) == 1 else self.rule(self.fresh(hint), " | ".join(names))

    def _types(self, schema: dict[str, Any], param: str) -> list[str]:
        kind = schema.get("type")
        if kind is None:
            return []
        kinds = kind if isinstance(kind, list) else [kind]
        for i, k in enumerate(kinds):
            if not isinstance(k, str) or k not in _TYPE_KEYWORDS:
                where = f"{param}.type" if not isinstance(kind, list) else f"{param}.type[{i}]"
                raise _refuse(where, f"unknown type {k!r}.")
        return list(dict.fromkeys(kinds))

    def _ref(self, ref: Any, param: str, doc: Any, doc_param: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _refuse(param, "only local references ('#', '#/$defs/…') are supported.")
        key = (id(doc), ref)
        if key in self._head:
            raise _refuse(param, f"the reference {ref!r} refers to itself before any content.")
        if key in self._refs:
            return self._refs[key]
        target, where = doc, doc_param
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise _refuse(param, f"the reference {ref!r} points nowhere.")
            target, where = target[part], f"{where}.{part}"
        name = self.fresh("ref-" + (ref.rsplit("/", 1)[-1] or "root"))
        self._refs[key] = name
        self._head.add(key)
        try:
            body = self._compile(target, where, doc, doc_param, name + "-body")
        finally:
            self._head.discard(key)
        self.rule(name, body)
        return name

    def _typed(
        self, kind: str, schema: dict[str, Any], param: str, doc: Any, doc_param: str, hint: str
    ) -> str:
        if kind in ("object", "array"):
            head, self._head = self._head, set()  # `{` / `[` comes first: recursion below is fine
            try:
                if kind == "object":
                    return self._object(schema, param, doc, doc_param, hint)
                return self._array(schema, param, doc, doc_param, hint)
            finally:
                self._head = head
        if kind == "string":
            return self._string(schema, param, hint)
        if kind == "integer" and "minimum" in schema:
            minimum = schema["minimum"]
            if minimum == 0 and minimum is not False:
                return self.rule(self.fresh(hint), '"0" | [1-9] [0-9]{0,15}')
            if minimum == 1 and minimum is not True:
                return self.rule(self.fresh(hint), "[1-9] [0-9]{0,15}")
            raise _refuse(f"{param}.minimum", "integer 'minimum' is supported only as 0 or 1.")
        return kind  # integer, number, boolean, null: base rules

    def _object(self, schema: dict[str, Any], param: str, doc: Any, doc_param: str, hint: str) -> str:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise _refuse(f"{param}.properties", "'properties' must be an object.")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _refuse(f"{param}.required", "'required' must be an array of property names.")
        extra = schema.get("additionalProperties", True)
        if not props and not required:
            if extra is False:
                return self.rule(self.fresh(hint), '"{}"')
            value = (
                "value"
                if extra is True
                else self._compile(extra, f"{param}.additionalProperties", doc, doc_param, hint + "-extra")
            )
            pair = f'string ":" sp {value}'
            return self.rule(self.fresh(hint), f'"{{" ( {pair} ( "," sp {pair} )* )? "}}"')
        if not isinstance(extra, bool | dict):
            raise _refuse(f"{param}.additionalProperties", "must be a boolean or a schema.")
        if isinstance(extra, dict):  # checked (it must compile) though only declared properties are made
            self._compile(extra, f"{param}.additionalProperties", doc, doc_param, hint + "-extra")
        pairs: list[tuple[str, bool]] = []
        names = list(dict.fromkeys([*required, *props]))
        for name in names:
            sub = props.get(name, True)
            value = self._compile(sub, f"{param}.properties.{name}", doc, doc_param, f"{hint}-{name}")
            pairs.append((f'{gbnf_literal(_json_text(name))} ":" sp {value}', name in required))
        body = self._object_body(pairs, hint)
        return self.rule(self.fresh(hint), f'"{{" {body} "}}"')

    def _object_body(self, pairs: list[tuple[str, bool]], hint: str) -> str:
        mandatory = [p for p, req in pairs if req]
        optional = [p for p, req in pairs if not req]
        if mandatory:
            head = ' "," sp '.join(mandatory)
            tail = " ".join(f'( "," sp {p} )?' for p in optional)
            return f"{head} {tail}".strip()
        # No required property: any ordered subset of the optional ones, commas between.
        alternatives = []
        for i, first in enumerate(optional):
            rest = " ".join(f'( "," sp {p} )?' for p in optional[i + 1 :])
            alternatives.append(f"{first} {rest}".strip())
        return "( " + " | ".join(f"( {a} )" for a in alternatives) + " )?"

    def _array(self, schema: dict[str, Any], param: str, doc: Any, doc_param: str, hint: str) -> str:
        item = self._compile(schema.get("items", True), f"{param}.items", doc, doc_param, hint + "-item")
        low, high = self._bounds(schema, param, "minItems", "maxItems")
        if high == 0:
            return self.rule(self.fresh(hint), '"[]"')
        more = _repeat(f'( "," sp {item} )', max(0, low - 1), None if high is None else high - 1)
        inner = f"{item} {more}".strip()
        body = f'"[" {inner} "]"' if low >= 1 else f'"[" ( {inner} )? "]"'
        return self.rule(self.fresh(hint), body)

    def _string(self, schema: dict[str, Any], param: str, hint: str) -> str:
        if "format" in schema:
            fmt = schema["format"]
            if not isinstance(fmt, str) or fmt not in _FORMATS:
                raise _refuse(f"{param}.format", f"the format {fmt!r} is not supported.")
            if "minLength" in schema or "maxLength" in schema:
                raise _refuse(f"{param}.format", "'format' cannot be combined with lengths.")
            return self.rule(self.fresh(hint), _FORMATS[fmt])
        low, high = self._bounds(schema, param, "minLength", "maxLength")
        if low == 0 and high is None:
            return "string"
        return self.rule(self.fresh(hint), f'"\\"" {_repeat("char", low, high)} "\\""')

    def _bounds(
        self, schema: dict[str, Any], param: str, low_key: str, high_key: str
    ) -> tuple[int, int | None]:
        low, high = schema.get(low_key, 0), schema.get(high_key)
        for key, value in ((low_key, low), (high_key, high)):
            if value is None and key == high_key:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPEAT:
                raise _refuse(f"{param}.{key}", f"'{key}' must be an integer from 0 to {MAX_REPEAT}.")
        if high is not None and high < low:
            raise _refuse(f"{param}.{high_key}", f"'{high_key}' is below '{low_key}'.")
        return low, high


def _repeat(item: str, low: int, high: int | None) -> str:
    if high is None:
        return f"{item}*" if low == 0 else f"{item}{{{low},}}"
    if low == high:
        return "" if low == 0 else f"{item}{{{low}}}"
    return f"{item}{{{low},{high}}}"


def schema_grammar(schema: Any, param: str) -> str:
    """A grammar whose language is the JSON texts `schema` accepts; raises `invalid_json_schema`."""
    builder = GrammarBuilder()
    return builder.render(builder.schema(schema, param))


def json_object_grammar() -> str:
    """`response_format: json_object`: any JSON object."""
    return GrammarBuilder().render("object")
