"""cdc_service: Sequin CDC events from NATS JetStream to enriched, deduplicated per-agent events."""

# The one source of the version: pyproject.toml reads it ([tool.setuptools.dynamic]), --version, the start-up log
# line and the cdc_consumer_build_info gauge show it.
__version__ = "0.1.0"

from cdc_service.config import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "__version__", "load_settings", "main"]


def main() -> int:
    """Entry point of ``python -m cdc_service``."""
    from cdc_service.__main__ import main as _main

    return _main()
