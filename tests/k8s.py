"""What Kubernetes puts into a pod's environment for each Service of its namespace (``enableServiceLinks``, on by
default), following the kubelet (pkg/kubelet/envvars): ``<NAME>_SERVICE_HOST``, ``<NAME>_SERVICE_PORT``,
``<NAME>_SERVICE_PORT_<PORT NAME>``, ``<NAME>_PORT`` and ``<NAME>_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]``, where
``<NAME>`` is the Service name in upper case with ``-`` turned into ``_``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def service_link_variables(
    name: str, ports: Sequence[dict[str, Any]], cluster_ip: str = "10.96.0.10"
) -> dict[str, str]:
    """The variables of one Service; ``ports`` as in its spec (``port``, optional ``name`` and ``protocol``)."""
    prefix = name.upper().replace("-", "_")
    env = {f"{prefix}_SERVICE_HOST": cluster_ip, f"{prefix}_SERVICE_PORT": str(ports[0]["port"])}
    for index, port in enumerate(ports):
        number, protocol = port["port"], port.get("protocol", "TCP")
        if port.get("name"):
            env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(number)
        url = f"{protocol.lower()}://{cluster_ip}:{number}"
        if index == 0:
            env[f"{prefix}_PORT"] = url
        base = f"{prefix}_PORT_{number}_{protocol.upper()}"
        env |= {base: url, f"{base}_PROTO": protocol.lower(), f"{base}_PORT": str(number), f"{base}_ADDR": cluster_ip}
    return env
