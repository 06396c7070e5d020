"""Utility modules for vitssl (synthetic data generation, helpers)."""
