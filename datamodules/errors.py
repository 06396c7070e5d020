"""The data layer's error type, in a module that imports nothing heavy: the dataset sources (and the
config's first validation pass, the synthetic-data generator) can raise it without importing torch."""


class DataError(RuntimeError):
    """Bad or missing data; the message names the flag or file, in one line (the CLI prints it whole).
    (One-string constructor, so DataLoader workers re-raise it with its type intact; their re-raised message
    adds the worker's traceback above the original line.)"""
