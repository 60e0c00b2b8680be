"""COLA audio representations on the Free Music Archive, as a reproducible pipeline."""

__version__ = "0.1.0"
