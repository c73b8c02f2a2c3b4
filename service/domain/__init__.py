"""Pure domain model: dialogs, lead facts and scoring. No I/O here."""
