"""The `dominator` program (main.py), thin: one module per command group."""
