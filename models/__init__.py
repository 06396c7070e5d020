"""Backbones, projector, losses and optimisers."""
