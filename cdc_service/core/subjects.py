"""Subject layouts and subject-token safety. Pure: no I/O.

A layout such as ``cdc.{company}.{table}`` or ``sequin.changes.{database}.{schema}.{table}.{action}`` names what each
token of an inbound subject means. Parsing is positional: a subject with a different number of tokens, or a literal
token that differs, does not fit the layout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

LAYOUT_TOKENS = frozenset({"company", "table", "database", "schema", "action"})
MAX_TOKEN_BYTES = 256

# A value placed in a subject must stay exactly one token and must not become a wildcard: anything that could
# change which subscribers receive it (".", "*", ">"), or that NATS forbids (whitespace, control characters), is
# rejected rather than cleaned, so one tenant can never be steered into another tenant's subjects.
_UNSAFE = re.compile(r"[.*>\s\x00-\x1f\x7f-\x9f]")
_PLACEHOLDER = re.compile(r"^\{([a-z_]+)\}$")


class LayoutError(ValueError):
    """A subject layout that cannot be used; the message says which token is wrong."""


def token_problem(value: str) -> str | None:
    """Return why ``value`` cannot be one subject token, or ``None`` when it can."""
    if not value:
        return "is empty"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > MAX_TOKEN_BYTES:
        return f"is longer than {MAX_TOKEN_BYTES} bytes"
    if _UNSAFE.search(value):
        return "contains '.', '*', '>', whitespace or a control character"
    return None


@dataclass(slots=True)
class SubjectInfo:
    """What an inbound subject says about its message."""

    table: str
    company: str | None = None
    database: str | None = None
    schema: str | None = None
    action: str | None = None


class SubjectLayout:
    """A compiled inbound subject layout."""

    __slots__ = ("_fields", "_literals", "_size", "has_company", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        tokens = text.split(".")
        literals: list[tuple[int, str]] = []
        fields: list[tuple[int, str]] = []
        for index, token in enumerate(tokens):
            match = _PLACEHOLDER.match(token)
            if match:
                name = match.group(1)
                if name not in LAYOUT_TOKENS:
                    raise LayoutError(f"unknown token {{{name}}}; allowed: {', '.join(sorted(LAYOUT_TOKENS))}")
                if any(existing == name for _, existing in fields):
                    raise LayoutError(f"token {{{name}}} appears twice")
                fields.append((index, name))
            elif "{" in token or "}" in token or token_problem(token):
                raise LayoutError(
                    f"token {token!r} is neither a literal nor one of {{{'}, {'.join(sorted(LAYOUT_TOKENS))}}}"
                )
            else:
                literals.append((index, token))
        if not any(name == "table" for _, name in fields):
            raise LayoutError("the layout must contain {table}")
        self._size = len(tokens)
        self._literals = tuple(literals)
        self._fields = tuple(fields)
        self.has_company = any(name == "company" for _, name in fields)

    def parse(self, subject: str) -> SubjectInfo | str:
        """Return the subject's tokens by meaning, or a sentence saying why it does not fit (never raises).

        Token values are returned as they are; whoever places one in another subject checks it with
        ``token_problem`` first.
        """
        tokens = subject.split(".")
        if len(tokens) != self._size:
            return f"subject has {len(tokens)} tokens, layout {self.text!r} has {self._size}"
        for index, literal in self._literals:
            if tokens[index] != literal:
                return f"token {index + 1} is {tokens[index]!r}, layout {self.text!r} expects {literal!r}"
        return SubjectInfo(**{name: tokens[index] for index, name in self._fields})


def covers(pattern: str, tokens: Sequence[str | None]) -> bool:
    """Whether the NATS subject ``pattern`` (with ``*`` and ``>``) matches every subject of this shape.

    ``tokens`` are literal tokens, or ``None`` for a token that can take any value (a template placeholder).
    """
    parts = pattern.split(".")
    for i, part in enumerate(parts):
        if part == ">":
            return len(tokens) > i
        if i >= len(tokens):
            return False
        if part != "*" and part != tokens[i]:
            return False
    return len(parts) == len(tokens)
