"""Command-line plumbing shared by every program: one-line errors and exit codes,
the common address and security options, tables, JSON and progress bars."""
