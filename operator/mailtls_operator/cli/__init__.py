"""The ``mailtls`` command: run the operator, or render / validate / probe offline.

``render`` and ``validate`` apply exactly the checks the cluster applies (the
CRD's schema and CEL rules, then the model's own), so a CI pipeline can refuse
a bad policy before it is merged.  Exit status 2 means "refused": nothing is
printed on stdout then, and each error is one line on stderr naming the file,
the object and the field.

Layout: :mod:`.main` (the parser, ``render``, ``validate``), :mod:`.offline`
(the policy loading they and ``probe`` share), :mod:`.probe`, :mod:`.run`
(``run``'s options) and :mod:`.operate` (the running operator: the only
module here that imports kopf, loaded only by ``run``), :mod:`.logs`.
"""

from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]
