"""Subject layouts and subject-token safety. Pure: no I/O.

A layout such as ``cdc.{company}.{table}`` or ``sequin.changes.{database}.{schema}.{table}.{action}`` names what each
token of an inbound subject means. Parsing is positional: a subject with a different number of tokens, or a literal
token that differs, does not fit the layout. A token may put literal text around its field: with
``cdc.daisi_{company}.{table}`` the subject ``cdc.daisi_acme.messages`` has company ``acme`` (Sequin set-ups that name
tenant schemas ``daisi_<company>``). ``parse_template`` is the one parser of these templates, for layouts and for the
output subjects of routes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

LAYOUT_TOKENS = frozenset({"company", "table", "database", "schema", "action"})
MAX_TOKEN_BYTES = 256

# A value placed in a subject must stay exactly one token and must not become a wildcard: anything that could
# change which subscribers receive it (".", "*", ">"), or that NATS forbids (whitespace, control characters), is
# rejected rather than cleaned, so one tenant can never be steered into another tenant's subjects.
_UNSAFE = re.compile(r"[.*>\s\x00-\x1f\x7f-\x9f]")
_FIELD = re.compile(r"^([^{}]*)\{([A-Za-z_][A-Za-z0-9_]*)\}([^{}]*)$")


class LayoutError(ValueError):
    """A subject layout that cannot be used; the message says which token is wrong."""


@dataclass(frozen=True, slots=True)
class TemplateToken:
    """One token of a subject template: literal ``text``, or the field ``name`` with literal text around it."""

    text: str  # the token as written
    name: str | None = None
    prefix: str = ""
    suffix: str = ""

    def value_of(self, token: str) -> str | None:
        """The field's value in ``token``, or ``None`` when the token lacks the literal text or the value is empty."""
        if len(token) <= len(self.prefix) + len(self.suffix):
            return None
        if not (token.startswith(self.prefix) and token.endswith(self.suffix)):
            return None
        return token[len(self.prefix) : len(token) - len(self.suffix)]


def parse_template(text: str) -> tuple[TemplateToken, ...]:
    """Split a subject template into tokens. A token is literal text, or ``{name}`` with optional literal text on
    either side (``daisi_{company}``); at most one field per token. Raises ``ValueError`` naming the bad token."""
    tokens: list[TemplateToken] = []
    for token in text.split("."):
        match = _FIELD.match(token)
        if match:
            prefix, name, suffix = match.groups()
            if any(literal and token_problem(literal) for literal in (prefix, suffix)):
                raise ValueError(f"token {token!r}: the text around {{{name}}} is not allowed in a subject")
            tokens.append(TemplateToken(token, name, prefix, suffix))
        elif "{" in token or "}" in token or token_problem(token):
            raise ValueError(f"token {token!r} is neither a literal nor a {{field}} (with optional text around it)")
        else:
            tokens.append(TemplateToken(token))
    return tuple(tokens)


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
        try:
            tokens = parse_template(text)
        except ValueError as exc:
            raise LayoutError(f"{exc}; fields: {{{'}, {'.join(sorted(LAYOUT_TOKENS))}}}") from None
        literals: list[tuple[int, str]] = []
        fields: list[tuple[int, str, TemplateToken]] = []
        for index, token in enumerate(tokens):
            if token.name is None:
                literals.append((index, token.text))
                continue
            if token.name not in LAYOUT_TOKENS:
                raise LayoutError(f"unknown token {{{token.name}}}; allowed: {', '.join(sorted(LAYOUT_TOKENS))}")
            if any(name == token.name for _, name, _ in fields):
                raise LayoutError(f"token {{{token.name}}} appears twice")
            fields.append((index, token.name, token))
        if not any(name == "table" for _, name, _ in fields):
            raise LayoutError("the layout must contain {table}")
        self._size = len(tokens)
        self._literals = tuple(literals)
        self._fields = tuple(fields)
        self.has_company = any(name == "company" for _, name, _ in fields)

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
        values: dict[str, str] = {}
        for index, name, field in self._fields:
            if field.prefix or field.suffix:
                value = field.value_of(tokens[index])
                if value is None:
                    return f"token {index + 1} is {tokens[index]!r}, layout {self.text!r} expects {field.text!r}"
                values[name] = value
            else:
                values[name] = tokens[index]
        return SubjectInfo(**values)

    def position(self, name: str) -> int | None:
        """Index (0-based) of the token named ``name``, or None when the layout has no such token."""
        return next((index for index, existing, _ in self._fields if existing == name), None)


def captured_by(subject: str, patterns: Sequence[str]) -> bool:
    """Whether one of the stream subjects ``patterns`` already captures every subject that ``subject`` (itself a
    pattern) captures. JetStream refuses a stream whose subjects overlap, so such a subject must not be added."""
    tokens = subject.split(".")
    shape = [None if t in ("*", ">") else t for t in tokens]
    for pattern in patterns:
        # A tail ">" is captured only by a ">" at the same place or before it.
        if tokens[-1] == ">" and ">" not in pattern.split(".")[: len(tokens)]:
            continue
        if covers(pattern, shape):
            return True
    return False


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


# nats-server refuses a protocol line longer than max_control_line (4,096 bytes by default, not announced in INFO)
# and closes the connection. A publish line is ``HPUB <subject> <reply> <header bytes> <total bytes>``: this leaves
# room for our PubAck inbox (about 45 bytes) and the two sizes with a wide margin.
MAX_OUTBOUND_SUBJECT_BYTES = 3840
HASHED_SUBJECT_TOKEN = "_subject"  # dlq.<HASHED_SUBJECT_TOKEN>.<hash>: the source subject could not be kept


def subject_bytes(subject: str) -> bytes:
    """The bytes a subject had on the wire. Subjects that are not valid UTF-8 arrive with their bad bytes kept as
    lone surrogates (``surrogateescape``); this is the inverse. Any other lone surrogate (only possible from Python
    callers) is kept as its UTF-8-like encoding, so distinct subjects never give the same bytes."""
    try:
        return subject.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return subject.encode("utf-8", "surrogatepass")


def publishable_subject_problem(subject: str, max_bytes: int = MAX_OUTBOUND_SUBJECT_BYTES) -> str | None:
    """Why ``subject`` cannot be published as it is (``None`` when it can): too long for the server's control line,
    not valid UTF-8, a wildcard or empty token, whitespace or a control character."""
    try:
        size = len(subject.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > max_bytes:
        return f"is {size} bytes, more than the {max_bytes} a published subject may have"
    for token in subject.split("."):
        if not token or token in ("*", ">"):
            return "has an empty or wildcard token"
    if _UNSAFE_IN_SUBJECT.search(subject):
        return "contains whitespace or a control character"
    return None


_UNSAFE_IN_SUBJECT = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def dead_letter_subject(prefix: str, source: str, max_bytes: int = MAX_OUTBOUND_SUBJECT_BYTES) -> str:
    """``<prefix>.<source subject>``, or, when that could not be published (too long, not UTF-8, a wildcard
    token), ``<prefix>._subject.<first 32 hex digits of the SHA-256 of the source subject's bytes>``: deterministic,
    so every delivery of one message goes to the same subject, and always within the server's limits."""
    subject = f"{prefix}.{source}"
    if publishable_subject_problem(subject, max_bytes) is None:
        return subject
    digest = hashlib.sha256(subject_bytes(source)).hexdigest()[:32]
    return f"{prefix}.{HASHED_SUBJECT_TOKEN}.{digest}"


def printable_subject(subject: str) -> tuple[str, bool]:
    """``(text, escaped)``: the subject itself when it is valid, printable UTF-8, else with each undecodable byte as
    ``\\xNN`` and each other unprintable character as ``\\xNN``/``\\uNNNN`` (``escaped`` is then true). For
    headers and logs, which cannot carry those characters."""
    if subject.isprintable():
        try:
            subject.encode("utf-8")
            return subject, False
        except UnicodeEncodeError:
            pass
    out = []
    for char in subject:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char == "\\" or not char.isprintable() or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out), True
