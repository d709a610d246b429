"""Command-line entry points (``tokred-*`` console scripts)."""
