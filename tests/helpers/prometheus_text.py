"""A strict reader of the Prometheus text exposition format 0.0.4, written from the spec, for tests."""

from __future__ import annotations

import math
import re

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


class ExpositionError(ValueError):
    pass


def _value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}[text]
    try:
        return float(text)
    except ValueError as exc:
        raise ExpositionError(f"bad sample value {text!r}") from exc


def _labels(text: str, line: str) -> tuple[tuple[str, str], ...]:
    """Parse `a="x",b="y\\"z"` (the text between the braces)."""
    labels: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        match = LABEL_NAME.match(text, i)
        if not match or text[match.end():match.end() + 2] != '="':
            raise ExpositionError(f"bad label in {line!r}")
        name, i = match.group(), match.end() + 2
        value = []
        while True:
            if i >= len(text):
                raise ExpositionError(f"unterminated label value in {line!r}")
            ch = text[i]
            if ch == "\\":
                nxt = text[i + 1:i + 2]
                if nxt not in ("\\", '"', "n"):
                    raise ExpositionError(f"bad escape in {line!r}")
                value.append("\n" if nxt == "n" else nxt)
                i += 2
            elif ch == '"':
                i += 1
                break
            elif ch == "\n":
                raise ExpositionError(f"raw newline in a label value: {line!r}")
            else:
                value.append(ch)
                i += 1
        if name in dict(labels):
            raise ExpositionError(f"label {name} twice in {line!r}")
        labels.append((name, "".join(value)))
        if i < len(text):
            if text[i] != ",":
                raise ExpositionError(f"expected ',' in {line!r}")
            i += 1
    return tuple(sorted(labels))


def parse(text: str) -> dict[str, dict]:
    """name -> {"type", "help", "samples": {sorted label pairs: value}}; raises on any violation."""
    if not text.endswith("\n"):
        raise ExpositionError("the exposition must end with a newline")
    families: dict[str, dict] = {}
    current: str | None = None
    for line in text.split("\n")[:-1]:
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not NAME.fullmatch(name):
                    raise ExpositionError(f"bad metric name {name!r}")
                family = families.setdefault(name, {"type": None, "help": None, "samples": {}})
                if family["samples"]:
                    raise ExpositionError(f"{parts[1]} for {name} after its samples")
                key = parts[1].lower()
                if family[key] is not None:
                    raise ExpositionError(f"second {parts[1]} line for {name}")
                family[key] = parts[3] if len(parts) > 3 else ""
                if key == "type" and family["type"] not in TYPES:
                    raise ExpositionError(f"unknown type {family['type']!r}")
                current = name
            continue
        match = NAME.match(line)
        if not match:
            raise ExpositionError(f"bad sample line {line!r}")
        name, rest = match.group(), line[match.end():]
        labels: tuple[tuple[str, str], ...] = ()
        if rest.startswith("{"):
            close = _closing_brace(rest, line)
            labels = _labels(rest[1:close], line)
            rest = rest[close + 1:]
        fields = rest.split()
        if not rest.startswith(" ") or not 1 <= len(fields) <= 2:
            raise ExpositionError(f"bad sample line {line!r}")
        if name != current:
            raise ExpositionError(f"sample {name} outside its family's group (after {current})")
        family = families[name]
        if labels in family["samples"]:
            raise ExpositionError(f"duplicate sample {line!r}")
        family["samples"][labels] = _value(fields[0])
    return families


def _closing_brace(rest: str, line: str) -> int:
    in_string, i = False, 1
    while i < len(rest):
        ch = rest[i]
        if in_string and ch == "\\":
            i += 2
            continue
        if ch == '"':
            in_string = not in_string
        elif ch == "}" and not in_string:
            return i
        i += 1
    raise ExpositionError(f"unclosed label set in {line!r}")


def value(families: dict[str, dict], name: str, **labels: str) -> float:
    return families[name]["samples"][tuple(sorted(labels.items()))]
