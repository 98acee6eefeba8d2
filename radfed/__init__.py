"""radfed: federated learning for radiology with per-site and per-subgroup metrics."""

from radfed.errors import ConfigError, DataError, RadfedError

__version__ = "0.1.0"

#: Version of the statistics schema that sites send; the server refuses others by name.
STATS_SCHEMA_VERSION = 1

__all__ = ["STATS_SCHEMA_VERSION", "ConfigError", "DataError", "RadfedError", "__version__"]
