"""Serve reinforcement-learning policies over HTTP."""

__version__ = "0.1.0"
