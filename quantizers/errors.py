"""The one error type of the quantizers package.

It derives from ValueError (not from the toolkit's EdgeError) because this package imports
nothing of ours; edge_export wraps it at its boundary. Messages name the tensor or option at
fault and what would fix it.
"""


class QuantizationError(ValueError):
    """A weight or option cannot be quantized as asked (bad group size, NaN, unknown scheme)."""
