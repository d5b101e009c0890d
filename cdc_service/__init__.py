"""cdc_service: Sequin CDC events from NATS JetStream to enriched, deduplicated per-agent events."""

from cdc_service.config import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings", "main"]
__version__ = "0.1.0"


def main() -> int:
    """Entry point of ``python -m cdc_service``."""
    from cdc_service.__main__ import main as _main

    return _main()
