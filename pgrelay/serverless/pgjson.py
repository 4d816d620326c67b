"""PostgreSQL text-format values to JSON values, as Neon's sql_over_http does when raw text output is off."""

from __future__ import annotations

import json
import math

BOOL, INT2, INT4, FLOAT4, FLOAT8, JSON, JSONB, BOX = 16, 21, 23, 700, 701, 114, 3802, 603

# Built-in array type OID -> element type OID (pg_type.typarray of PostgreSQL 15-18's fixed OIDs).
# Arrays of user-defined types (enums, domains, composites) have OIDs of their database: strings.
ARRAY_ELEMENT = {
    1000: BOOL, 1001: 17, 1002: 18, 1003: 19, 1005: INT2, 1006: 22, 1007: INT4, 1008: 24, 1009: 25,
    1028: 26, 1010: 27, 1011: 28, 1012: 29, 1013: 30, 199: JSON, 143: 142, 1016: 20, 1017: 600,
    1018: 601, 1019: 602, 1020: BOX, 1027: 604, 629: 628, 1021: FLOAT4, 1022: FLOAT8, 719: 718,
    791: 790, 1040: 829, 1041: 869, 651: 650, 775: 774, 1034: 1033, 1014: 1042, 1015: 1043,
    1182: 1082, 1183: 1083, 1115: 1114, 1185: 1184, 1187: 1186, 1270: 1266, 1561: 1560, 1563: 1562,
    1231: 1700, 2951: 2950, 3807: JSONB, 4073: 4072, 3221: 3220, 3643: 3614, 3645: 3615,
    3905: 3904, 3907: 3906, 3909: 3908, 3911: 3910, 3913: 3912, 3927: 3926, 2287: 2249, 1263: 2275,
    2210: 2205, 2211: 2206, 2949: 2970, 271: 5069,
}


class MalformedArray(ValueError):
    """A text value that does not parse as its type says (a malformed array literal)."""


def to_json(text: str | None, type_oid: int):
    """The JSON value (Python object; JSON text is embedded as a `Raw`) of one column value."""
    if text is None:
        return None
    element = ARRAY_ELEMENT.get(type_oid)
    if element is not None:
        return parse_array(text, element)
    return _scalar(text, type_oid)


class Raw(str):
    """JSON text embedded as is (json/jsonb values): `dumps` writes it unquoted."""


def _scalar(text: str, type_oid: int):
    if type_oid == BOOL:
        return text == "t"
    if type_oid in (INT2, INT4):
        return int(text)
    if type_oid in (FLOAT4, FLOAT8):
        value = float(text)
        return value if math.isfinite(value) else text  # NaN, Infinity, -Infinity stay strings
    if type_oid in (JSON, JSONB):
        return Raw(text)
    return text


def parse_array(text: str, element_oid: int) -> list:
    """A PostgreSQL array literal's elements, nested lists for more dimensions, NULL -> None.
    Dimension decorations ([1:2]={...}) are dropped."""
    pos = 0
    if text.startswith("["):
        eq = text.find("=")
        if eq < 0:
            raise MalformedArray("malformed array literal: dimensions without '='")
        pos = eq + 1
    delim = ";" if element_oid == BOX else ","
    value, pos = _parse_level(text, pos, delim, element_oid)
    if text[pos:].strip():
        raise MalformedArray("malformed array literal: junk after closing right brace")
    return value


def _parse_level(text: str, pos: int, delim: str, element_oid: int) -> tuple[list, int]:
    n = len(text)
    while pos < n and text[pos].isspace():
        pos += 1
    if pos >= n or text[pos] != "{":
        raise MalformedArray("malformed array literal: expected '{'")
    pos += 1
    out: list = []
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            raise MalformedArray("malformed array literal: unexpected end")
        ch = text[pos]
        if ch == "}" and not out:
            return out, pos + 1
        if ch == "{":
            item, pos = _parse_level(text, pos, delim, element_oid)
            out.append(item)
        elif ch == '"':
            pos += 1
            chars = []
            while True:
                if pos >= n:
                    raise MalformedArray("malformed array literal: unterminated quoted element")
                ch = text[pos]
                if ch == "\\":
                    if pos + 1 >= n:
                        raise MalformedArray("malformed array literal: unterminated escape")
                    chars.append(text[pos + 1])
                    pos += 2
                elif ch == '"':
                    pos += 1
                    break
                else:
                    chars.append(ch)
                    pos += 1
            out.append(_scalar("".join(chars), element_oid))
        else:
            chars = []
            while pos < n and text[pos] not in (delim, "}"):
                if text[pos] == "\\" and pos + 1 < n:
                    chars.append(text[pos + 1])
                    pos += 2
                    continue
                chars.append(text[pos])
                pos += 1
            raw = "".join(chars).strip()
            if raw.upper() == "NULL":
                out.append(None)
            else:
                out.append(_scalar(raw, element_oid))
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            raise MalformedArray("malformed array literal: unexpected end")
        if text[pos] == delim:
            pos += 1
        elif text[pos] == "}":
            return out, pos + 1
        else:
            raise MalformedArray(f"malformed array literal: unexpected {text[pos]!r}")


_scalar_json = json.JSONEncoder(ensure_ascii=False).encode


def dumps(value) -> str:
    """Compact JSON text of a value from `to_json` (json/jsonb `Raw` text embedded unquoted)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(_scalar_json(k) + ":" + dumps(v) for k, v in value.items()) + "}"
    return _scalar_json(value)
