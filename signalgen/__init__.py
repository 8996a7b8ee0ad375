"""signalgen: turn ML model predictions into trading signals for many clients at once."""

__version__ = "0.1.0"
