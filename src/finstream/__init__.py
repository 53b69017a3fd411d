"""finstream: the event backbone of a financial-planning platform."""

__version__ = "0.1.0"
