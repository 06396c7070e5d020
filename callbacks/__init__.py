"""Optional training behaviour, each in its own callback."""
