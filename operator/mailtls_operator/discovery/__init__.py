"""Discovery: policies that follow what a partner publishes (MTA-STS, DANE).

The pure core (``mtasts``, ``decide``, ``precedence``, ``versions``, ``explain``)
imports no network library: it parses, decides and turns decisions into
:class:`~mailtls_operator.policy.Policy` entries that the one renderer
resolves with every other policy.  The thin I/O shell (``dns``, ``fetch``,
``engine``) asks DNS and HTTPS and hands the answers to the core, so the
operator and ``mailtls discover`` take the same path.
"""
