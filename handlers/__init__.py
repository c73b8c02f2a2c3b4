"""aiohttp entry points: webhook intake, REST /dialogs/*, health, readiness, metrics."""
