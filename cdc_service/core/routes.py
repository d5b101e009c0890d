"""Routes: which tables are published, under which primary key and subject template. Pure: no I/O.

Routes are data (``routes.<table>.pk`` and ``routes.<table>.subject`` in the settings), so adding a table is a
settings change. A template such as ``wa.{company}.{agent_id}.messages.{chat_id}`` has literal tokens and
placeholders; ``{company}`` is the event's company, any other placeholder names a column of the row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cdc_service.core.subjects import token_problem

_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
COMPANY = "company"


class RouteError(ValueError):
    """A route that cannot be used; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route for one table."""

    table: str
    pk: str
    template: str
    tokens: tuple[str | None, ...]  # literal text, or None where a placeholder goes
    placeholders: tuple[str, ...]  # placeholder names in token order (``company`` included)
    row_fields: tuple[str, ...]  # row columns needed as ids, in output order: subject placeholders, then the pk
    subject_fields: frozenset[str]  # the row columns among them that go into the subject

    def subject(self, values: dict[str, str]) -> str:
        """Render the target subject from already validated placeholder values."""
        parts: list[str] = []
        names = iter(self.placeholders)
        for token in self.tokens:
            parts.append(values[next(names)] if token is None else token)
        return ".".join(parts)


def compile_route(table: str, pk: str, template: str) -> Route:
    """Validate and compile one route. Raises ``RouteError`` naming the problem."""
    if token_problem(table):
        raise RouteError(f"table name {table!r} is not a valid subject token")
    if not pk or not isinstance(pk, str):
        raise RouteError("pk must be a non-empty column name")
    tokens: list[str | None] = []
    placeholders: list[str] = []
    for token in template.split("."):
        match = _PLACEHOLDER.match(token)
        if match:
            tokens.append(None)
            placeholders.append(match.group(1))
        elif "{" in token or "}" in token or token_problem(token):
            raise RouteError(f"subject template {template!r}: token {token!r} is neither a literal nor a {{column}}")
        else:
            tokens.append(token)
    if COMPANY not in placeholders:
        raise RouteError(f"subject template {template!r} must contain {{company}} so tenants stay apart")
    row_fields = [name for name in placeholders if name != COMPANY]
    if pk not in row_fields:
        row_fields.append(pk)
    subject_fields = frozenset(placeholders) - {COMPANY}
    return Route(table, pk, template, tuple(tokens), tuple(placeholders), tuple(row_fields), subject_fields)
