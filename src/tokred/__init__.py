"""tokred: token-reduction methods for vision transformers, compared under one cost model and one timing protocol.

The command line (``tokred-train``, ``tokred-eval``, ``tokred-benchmark`` ...) is the main interface; the functions
here serve people who bring their own timm model and training loop.
"""

from tokred.api import load, patch, save

__all__ = ["load", "patch", "save"]
