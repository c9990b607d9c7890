"""Command-line tools beyond the main three (run as `python scripts/NAME.py`); importable as `scripts.NAME`."""
