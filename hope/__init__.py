"""hope: Nested Learning and the HOPE architecture in PyTorch."""

__version__ = "0.1.0"
