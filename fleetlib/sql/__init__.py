"""SQL plumbing shared by every store: opening an engine from a URL (SQLite or
PostgreSQL) and the versioned migration runner."""
