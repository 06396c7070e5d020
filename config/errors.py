"""The config layer's error type, in a module that imports nothing: every layer can raise it (the run directory,
the checks of ``--trainer.resume``) without importing the parser. ``config.loading`` re-exports it."""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and what would be valid."""
