"""Reading a requirements lock as written by `uv pip compile` / pip-compile: exact pins, markers, hashes, `# via`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from packaging.markers import Marker
from packaging.utils import canonicalize_name
from packaging.version import Version

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+?)\s*(?:;\s*(?P<marker>.+?))?\s*$")
_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


@dataclass
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)

    def applies(self) -> bool:
        return self.marker is None or self.marker.evaluate()


def parse_lock(text: str) -> dict[str, Pin]:
    """Canonical name -> Pin, from pip-compile / `uv pip compile` output (continuations and `# via` comments)."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via_block = False
    logical: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if logical:
            logical.append(line.rstrip("\\").strip())
            if not line.endswith("\\"):
                current = _entry(" ".join(logical), pins)
                logical = []
            continue
        if not line:
            continue
        if line.startswith("#"):
            comment = line.lstrip("#").strip()
            if current is None:
                continue
            if comment == "via":
                in_via_block = True
            elif comment.startswith("via "):
                current.via.append(comment.removeprefix("via ").strip())
                in_via_block = False
            elif in_via_block and comment:
                current.via.append(comment)
            continue
        in_via_block = False
        if line.endswith("\\"):
            logical = [line.rstrip("\\").strip()]
        else:
            current = _entry(line, pins)
    assert not logical, "the lock ends inside a continued line"
    return pins


def _entry(line: str, pins: dict[str, Pin]) -> Pin:
    hashes = _HASH.findall(line)
    requirement = _HASH.sub("", line).strip()
    match = _PIN.match(requirement)
    assert match, f"not an exact pin: {requirement!r}"
    name = canonicalize_name(match["name"])
    assert name not in pins, f"{name} pinned twice"
    marker = Marker(match["marker"]) if match["marker"] else None
    pins[name] = Pin(name, Version(match["version"]), marker, hashes)
    return pins[name]
