"""Errors raised on bad input; each message names the offending input.

Like :mod:`lrcompile.types`, this module imports nothing else of the project.
"""


class LowRankError(Exception):
    """Base class of every error lrcompile raises on bad input."""


class LowRankConfigError(LowRankError, ValueError):
    """An option key or value is not allowed."""


class CalibrationError(LowRankError, ValueError):
    """Calibration data is missing, empty, does not fit the graph, or produced NaN/Inf."""


class WeightError(LowRankError, ValueError):
    """A layer's weight cannot be factored or quantised: it holds NaN or Inf."""


class NoCompressibleLinearError(LowRankError):
    """A graph holds parameters but no linear layer that may be compressed."""


class GraphBreakError(LowRankError):
    """Layers to compress lie in a graph Dynamo starts after a graph break, out of calibration's reach."""


class SavedPlanError(LowRankError):
    """A saved compressed model is missing, corrupted or does not match the model."""


class LatentCacheError(LowRankError):
    """A latent KV cache is full, mis-sized, or used with a model it was not built for."""
