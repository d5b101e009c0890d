"""Routes: which tables are published, under which primary key and subject template. Pure: no I/O.

Routes are data (``routes.<table>.pk`` and ``routes.<table>.subject`` in the settings), so adding a table is a
settings change. A template such as ``wa.{company}.{agent_id}.messages.{chat_id}`` has literal tokens and
placeholders; ``{company}`` is the event's company, any other placeholder names a column of the row. A placeholder
may have literal text around it inside its token (``wa.t_{company}``); templates are parsed by
``subjects.parse_template``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cdc_service.core.subjects import parse_template, token_problem

COMPANY = "company"


class RouteError(ValueError):
    """A route that cannot be used; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route for one table."""

    table: str
    pk: str
    template: str
    tokens: tuple[str | None, ...]  # literal text, or None where a placeholder goes (with any text around it)
    placeholders: tuple[str, ...]  # placeholder names in token order (``company`` included)
    row_fields: tuple[str, ...]  # row columns needed as ids, in output order: subject placeholders, then the pk
    subject_fields: frozenset[str]  # the row columns among them that go into the subject
    columns: frozenset[str] | None = None  # the columns a row is expected to have; None: not checked
    routing_cache: bool = False  # remember each row's subject fields so a delete with only the pk can be routed
    # The template as a printf-style format with named fields, "wa.%(company)s.%(agent_id)s.messages.%(chat_id)s".
    subject_format: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "subject_format", _percent_format(self.template))

    def subject(self, values: dict[str, str]) -> str:
        """Render the target subject from already validated placeholder values (``KeyError`` when one is missing).

        ``%`` with a mapping renders what ``template.format_map`` would (fields are bare names, ``parse_template``
        refuses braces in literal text, and a literal ``%`` is escaped) at two thirds of its cost per event."""
        return self.subject_format % values


def _percent_format(template: str) -> str:
    parts = []
    for token in parse_template(template):
        if token.name is None:
            parts.append(token.text.replace("%", "%%"))
        else:
            parts.append(f"{token.prefix.replace('%', '%%')}%({token.name})s{token.suffix.replace('%', '%%')}")
    return ".".join(parts)


def compile_route(
    table: str, pk: str, template: str, columns: tuple[str, ...] | None = None, *, routing_cache: bool = False
) -> Route:
    """Validate and compile one route. Raises ``RouteError`` naming the problem."""
    if token_problem(table):
        raise RouteError(f"table name {table!r} is not a valid subject token")
    if not pk or not isinstance(pk, str):
        raise RouteError("pk must be a non-empty column name")
    try:
        parts = parse_template(template)
    except ValueError as exc:
        raise RouteError(f"subject template {template!r}: {exc}") from None
    tokens = [t.text if t.name is None else None for t in parts]
    placeholders = [t.name for t in parts if t.name is not None]
    if COMPANY not in placeholders:
        raise RouteError(f"subject template {template!r} must contain {{company}} so tenants stay apart")
    row_fields = [name for name in placeholders if name != COMPANY]
    if pk not in row_fields:
        row_fields.append(pk)
    subject_fields = frozenset(placeholders) - {COMPANY}
    expected = _expected_columns(columns, row_fields)
    return Route(
        table,
        pk,
        template,
        tuple(tokens),
        tuple(placeholders),
        tuple(row_fields),
        subject_fields,
        expected,
        routing_cache,
    )


def _expected_columns(columns: tuple[str, ...] | None, row_fields: list[str]) -> frozenset[str] | None:
    """The columns a row is expected to have, which must include every column the route reads."""
    if columns is None:
        return None
    missing = [name for name in row_fields if name not in columns]
    if missing:
        raise RouteError(f"columns must include {missing[0]!r}, which the route needs")
    return frozenset(columns)
