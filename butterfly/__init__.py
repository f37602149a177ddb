"""Butterfly: discover peers, elect a coordinator, load only your layers, prove them, then serve."""

__version__ = "0.1.0"
