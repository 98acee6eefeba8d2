"""Site privacy: the site policy (what may leave, which runs, what a run may cost) and the
site's audit log."""

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
from radfed.privacy.limits import LimitExceeded, ResourceLimits
from radfed.privacy.policy import BundleRule, DifferentialPrivacy, SitePolicy
from radfed.privacy.policy_file import load_policy
from radfed.privacy.refusal import PolicyRefusal

__all__ = [
    "AuditEntry",
    "AuditKind",
    "AuditLog",
    "BundleRule",
    "DifferentialPrivacy",
    "LimitExceeded",
    "PolicyRefusal",
    "Request",
    "ResourceLimits",
    "SitePolicy",
    "load_policy",
    "read_entries",
    "serialize_content",
    "verify",
    "weights_digest",
]
