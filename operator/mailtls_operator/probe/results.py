"""What a probe concludes: the result and reason constants and the outcome records.  Pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

from ..crd.timefmt import format_rfc3339

# -- results -------------------------------------------------------------------

PASS: Final = "Pass"
FAIL: Final = "Fail"
SKIPPED: Final = "Skipped"

# Pass reasons
VERIFIED: Final = "Verified"
"""The certificate passed the level's checks (trust + name, digest, or TLSA)."""
ENCRYPTED: Final = "Encrypted"
"""A TLS session was established (``may``/``encrypt``: no certificate checks)."""
PLAIN_ALLOWED: Final = "PlainAllowed"
"""No TLS (not offered, or level ``none``), and the level allows clear text."""

# Fail reasons
NO_STARTTLS: Final = "NoStartTLS"
UNTRUSTED: Final = "Untrusted"
NAME_MISMATCH: Final = "NameMismatch"
FINGERPRINT_MISMATCH: Final = "FingerprintMismatch"
PROTOCOL_MISMATCH: Final = "ProtocolMismatch"
HANDSHAKE_FAILED: Final = "HandshakeFailed"
UNREACHABLE: Final = "Unreachable"
TIMEOUT: Final = "Timeout"
DNSSEC_UNAVAILABLE: Final = "DNSSECUnavailable"
NO_TLSA_RECORDS: Final = "NoTLSARecords"
CONFIG_ERROR: Final = "ConfigError"
"""A local problem Postfix would also defer on, e.g. a missing trust-anchor file."""
ERROR: Final = "Error"

# Skip reason
NOT_PROBEABLE: Final = "NotProbeable"

LEVELS: Final = ("none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify",
                 "secure")
TLS_REQUIRED: Final = frozenset({"encrypt", "dane-only", "fingerprint", "verify", "secure"})
MUST_MATCH: Final = frozenset({"fingerprint", "verify", "secure"})
MAX_MESSAGE: Final = 1024
PROGRAM: Final = "posttls-finger"


@dataclass(frozen=True)
class ProbeResult:
    """The verdict on one ``posttls-finger`` run: result, CamelCase reason, decisive line."""

    result: str
    reason: str
    message: str

    @property
    def passed(self) -> bool:
        return self.result == PASS


@dataclass(frozen=True)
class ProbeOutcome:
    """One destination (policy key) probed from one pod."""

    destination: str
    result: str
    reason: str
    message: str
    time: datetime
    pod: str = ""

    @property
    def failed(self) -> bool:
        return self.result == FAIL

    @property
    def time_rfc3339(self) -> str:
        return rfc3339(self.time)

    def to_status(self) -> dict[str, str]:
        """The ``status.probes[]`` item (the controller adds the instance)."""
        return {"destination": self.destination, "result": self.result,
                "reason": self.reason, "message": self.message, "time": self.time_rfc3339}


def rfc3339(when: datetime) -> str:
    """``2026-01-02T03:04:05Z``: the form Kubernetes writes (the year always four digits:
    ``strftime("%Y")`` writes year 1 as ``1``, which no RFC 3339 reader accepts)."""
    return format_rfc3339(when)
