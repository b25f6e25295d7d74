"""The audit log reader moved to :mod:`testbed.audit` (shared with tests/postfix); the
names stay importable from here for the tests of this directory."""

from testbed.audit import WRITE_VERBS, AuditLog, Request

__all__ = ["WRITE_VERBS", "AuditLog", "Request"]
