"""Command-line programs beside ``main.py``, each run as ``python -m tools.<name> ...``."""
