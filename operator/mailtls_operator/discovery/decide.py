"""What a domain's published policy means for the table: cache, refresh, DANE, result.

Pure: the I/O shell (:mod:`.engine`) feeds it DNS and HTTPS answers; every
decision (refetch or keep, DANE or not, what is written) is made here and
tested without a network.

Refresh semantics (RFC 8461 §5.1): a fetched policy is cached until
``fetched_at + max_age``.  It is refetched when the TXT ``id`` changes, when
it is missing or expired, and ahead of expiry (within the last tenth of
``max_age``, at most one day).  A failed refresh -- DNS or HTTPS -- keeps the
unexpired cached policy and says so in ``last_error``; a vanished TXT record
does not revoke a cached policy either (publishing ``mode: none`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from .mtasts import StsPolicy, StsRecord, mx_to_match

MAX_REFRESH_AHEAD = timedelta(days=1)

MTA_STS = "mta-sts"
DANE = "dane"
SOURCES = (MTA_STS, DANE)


@dataclass(frozen=True)
class CachedSts:
    """A fetched MTA-STS policy and when it was fetched."""

    id: str
    policy: StsPolicy
    fetched_at: datetime

    @property
    def expires_at(self) -> datetime:
        return self.fetched_at + timedelta(seconds=self.policy.max_age)

    def refresh_at(self) -> datetime:
        """When to refetch even if the id is unchanged: ahead of expiry."""
        ahead = min(timedelta(seconds=self.policy.max_age) / 10, MAX_REFRESH_AHEAD)
        return self.expires_at - ahead

    def valid(self, now: datetime) -> bool:
        return now < self.expires_at


@dataclass(frozen=True)
class TxtAnswer:
    """What DNS said at ``_mta-sts.<domain>``: a record, no record, or a failure."""

    record: StsRecord | None = None
    absent: str = ""
    """Why there is no usable record (NXDOMAIN, no TXT, malformed): the domain has none."""
    error: str = ""
    """The lookup itself failed (timeout, SERVFAIL): nothing can be concluded."""


FETCH = "fetch"
KEEP = "keep"
NONE = "none"
FAIL = "fail"


def sts_plan(cached: CachedSts | None, txt: TxtAnswer, now: datetime) -> str:
    """``fetch`` the policy, ``keep`` the cache, ``none`` (no policy) or ``fail`` (undecided)."""
    usable = cached if cached is not None and cached.valid(now) else None
    if txt.error:
        return KEEP if usable else FAIL
    if txt.record is None:
        return KEEP if usable else NONE
    if usable and usable.id == txt.record.id and now < usable.refresh_at():
        return KEEP
    return FETCH


@dataclass(frozen=True)
class StsOutcome:
    """MTA-STS for one domain after this round: the cache to carry and what it means."""

    cached: CachedSts | None
    decided: bool
    error: str = ""
    notes: tuple[str, ...] = ()


def sts_after(cached: CachedSts | None, txt: TxtAnswer, plan: str, now: datetime,
              fetched: StsPolicy | None = None, fetch_error: str = "") -> StsOutcome:
    """Combine the plan with the fetch result (when there was a fetch)."""
    usable = cached if cached is not None and cached.valid(now) else None
    if plan == FAIL:
        return StsOutcome(None, False, f"TXT lookup failed: {txt.error}")
    if plan == NONE:
        return StsOutcome(None, True, notes=(f"no MTA-STS policy: {txt.absent}",))
    if plan == KEEP:
        error = f"TXT lookup failed: {txt.error}" if txt.error else ""
        note = (f"cached policy id {usable.id} kept until "
                f"{usable.expires_at.isoformat()}") if usable else ""
        if txt.record is None and not txt.error and usable:
            note += f" (TXT record gone: {txt.absent})"
        return StsOutcome(usable, True, error, (note,) if note else ())
    assert txt.record is not None
    if fetched is not None:
        fresh = CachedSts(txt.record.id, fetched, now.replace(microsecond=0))
        why = ("new" if cached is None else
               "id changed" if cached.id != txt.record.id else
               "expired" if not cached.valid(now) else "refreshed ahead of expiry")
        return StsOutcome(fresh, True, notes=(f"policy id {txt.record.id} fetched ({why})",))
    if usable:
        return StsOutcome(usable, True, f"policy fetch failed: {fetch_error}",
                          (f"fetch failed; cached policy id {usable.id} kept until "
                           f"{usable.expires_at.isoformat()} (RFC 8461 §5.1)",))
    return StsOutcome(None, False, f"policy fetch failed: {fetch_error}")


def sts_value(policy: StsPolicy) -> str:
    """The table value an enforced MTA-STS policy means: ``secure`` with its MX names."""
    return f"secure match={':'.join(mx_to_match(policy.mx))} servername=hostname"


@dataclass(frozen=True)
class DaneAnswer:
    """What DNS said about the domain's MX hosts and their ``_25._tcp`` TLSA records."""

    mx: tuple[str, ...] = ()
    mx_secure: bool = False
    tlsa: dict[str, bool] = field(default_factory=dict)
    """MX host -> TLSA validated (AD bit); absent from the map: no TLSA records."""
    error: str = ""


@dataclass(frozen=True)
class DaneOutcome:
    """DANE for one domain: ``dane-only`` or nothing, always with the reason."""

    level: str | None
    decided: bool
    reason: str


def dane_decide(answer: DaneAnswer) -> DaneOutcome:
    """``dane-only`` only when every MX host has TLSA records and DNSSEC vouches for all.

    TLSA without validation writes nothing and says why (never a silent
    downgrade); TLSA on only some MX hosts writes nothing too, since
    ``dane-only`` would defer mail to the others.
    """
    if answer.error:
        return DaneOutcome(None, False, f"DANE lookup failed: {answer.error}")
    with_tlsa = [h for h in answer.mx if h in answer.tlsa]
    if not with_tlsa:
        return DaneOutcome(None, True, "no TLSA records at the MX hosts")
    unsigned = [h for h in with_tlsa if not answer.tlsa[h]]
    if unsigned or not answer.mx_secure:
        what = ", ".join(unsigned) if unsigned else "the MX records"
        return DaneOutcome(None, True, f"TLSA records found but {what} not DNSSEC-validated "
                                       "(no AD bit): nothing written")
    if len(with_tlsa) != len(answer.mx):
        missing = ", ".join(h for h in answer.mx if h not in answer.tlsa)
        return DaneOutcome(None, True, f"TLSA records at {len(with_tlsa)} of {len(answer.mx)} "
                                       f"MX hosts (none at {missing}); dane-only would defer "
                                       "to those: nothing written")
    return DaneOutcome("dane-only", True, f"TLSA records at every MX host "
                                          f"({', '.join(answer.mx)}), DNSSEC-validated")


@dataclass(frozen=True)
class DomainState:
    """One domain's discovered state: what the status reports and what is rendered."""

    domain: str
    sources: tuple[str, ...]
    dane: DaneOutcome | None = None
    sts: StsOutcome | None = None
    mx: tuple[str, ...] = ()

    @property
    def decided(self) -> bool:
        return all(o.decided for o in (self.dane, self.sts) if o is not None)

    @property
    def candidates(self) -> dict[str, tuple[str, str]]:
        """source -> (table value, mode) for every source that yields a line or a probe."""
        out: dict[str, tuple[str, str]] = {}
        if self.dane is not None and self.dane.level:
            out[DANE] = (self.dane.level, "enforce")
        if self.sts is not None and self.sts.cached is not None:
            policy = self.sts.cached.policy
            if policy.mode != "none":
                out[MTA_STS] = (sts_value(policy), policy.mode)
        return out

    def with_sts(self, sts: StsOutcome) -> DomainState:
        return replace(self, sts=sts)
