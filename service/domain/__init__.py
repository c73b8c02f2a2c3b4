"""Pure domain model: dialogs, lead facts, scoring, lead history and events. No I/O here."""
