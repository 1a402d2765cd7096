"""stadapter: what users import. `STAdapter` replaces the official ST-Adapter module.

Built only on the public names of `stadapter_kernels`.
"""

from .modules import STAdapter

__all__ = ["STAdapter"]
__version__ = "0.1.0"
