"""Site privacy: the site policy (what may leave, k, DP on updates) and the audit log."""

from radfed.privacy.audit import (
    AUDIT_FILE_NAME,
    AuditEntry,
    AuditKind,
    AuditLog,
    read_entries,
    serialize_content,
    verify,
)
from radfed.privacy.policy import (
    POLICY_FILE_NAME,
    DifferentialPrivacy,
    PolicyRefusal,
    SitePolicy,
    load_policy,
)

__all__ = [
    "AUDIT_FILE_NAME",
    "POLICY_FILE_NAME",
    "AuditEntry",
    "AuditKind",
    "AuditLog",
    "DifferentialPrivacy",
    "PolicyRefusal",
    "SitePolicy",
    "load_policy",
    "read_entries",
    "serialize_content",
    "verify",
]
