"""Site privacy: the site policy (what may leave, k, DP on updates) and the audit log."""

from radfed.privacy.audit import (
    AuditEntry,
    AuditKind,
    AuditLog,
    Request,
    read_entries,
    serialize_content,
    verify,
    weights_digest,
)
from radfed.privacy.policy import (
    BundleRule,
    DifferentialPrivacy,
    PolicyRefusal,
    SitePolicy,
    load_policy,
)

__all__ = [
    "AuditEntry",
    "AuditKind",
    "AuditLog",
    "BundleRule",
    "DifferentialPrivacy",
    "PolicyRefusal",
    "Request",
    "SitePolicy",
    "load_policy",
    "read_entries",
    "serialize_content",
    "verify",
    "weights_digest",
]
