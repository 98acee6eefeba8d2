"""Federation: what travels, reply checks, strategies, the run folder, server and client work."""

from radfed.federation.client import (
    ErrorCode,
    handle_evaluate,
    handle_query,
    handle_train,
    resolve_site,
)
from radfed.federation.records import InvalidReply, SiteIdentity
from radfed.federation.run_folder import POOLED_SITE, RunFolder, load_checkpoint
from radfed.federation.server import run_server
from radfed.federation.strategy import RadfedFedAvg

__all__ = [
    "POOLED_SITE",
    "ErrorCode",
    "InvalidReply",
    "RadfedFedAvg",
    "RunFolder",
    "SiteIdentity",
    "handle_evaluate",
    "handle_query",
    "handle_train",
    "load_checkpoint",
    "resolve_site",
    "run_server",
]
