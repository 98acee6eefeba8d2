"""radfed: federated learning for radiology with per-site and per-subgroup metrics."""

from radfed.errors import ConfigError, DataError, RadfedError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "RadfedError", "__version__"]
