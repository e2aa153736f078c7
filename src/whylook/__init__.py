"""whylook: why does your image classifier look there?

A reference implementation of I2X ("Why Does It Look There? Structured Explanations for
Image Classification", CVPR 2026): prototypes from the final model's features, Grad-CAM at
every training checkpoint, and a structured explanation of how each class was learned.
"""

from whylook.errors import WhylookError

__version__ = "0.1.0"

__all__ = ["WhylookError", "__version__"]
