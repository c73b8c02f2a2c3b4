"""Read-only access to Evolution API's PostgreSQL database."""
