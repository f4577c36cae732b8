"""Fused kernels for curvature products.

Triton is imported lazily inside the kernels that need it, so importing this
package never imports triton.
"""

from curvops.kernels.cross_entropy_hvp import cross_entropy_hvp

__all__ = ["cross_entropy_hvp"]
