"""The CRD in ``crds/`` as an executable validator: its OpenAPI schema and its CEL rules.

The CRD is the single source of validation truth.  The API server enforces it at
``kubectl apply``; this module makes the operator (at reconcile) and ``mailtls
validate`` (offline, in a GitOps pipeline) refuse exactly the same objects, by
loading the very same file.

CEL rules are evaluated through *twins*: Python functions proven equal to the
CEL expression by property tests (``tests/unit/test_cel_twins.py``) with
cel-python as the oracle.  A twin is looked up by the exact rule text, so a rule
edited in the CRD without a matching twin is still enforced, by cel-python
itself (slower, but never skipped).  cel-python measured 0.77-3.3 ms per policy;
twins keep 10,000 policies well under a second.

The schema is judged with the API server's semantics, not Python's: ``pattern``
is compiled by RE2 (``google-re2``, the library Go's ``regexp`` follows), where
``$`` matches only at the end of the text -- Python's ``re.search`` also lets it
match before a final newline, which let ``"example.com\n"`` through -- and
``\\d``/``\\w`` are ASCII; ``x-kubernetes-list-type: set`` refuses duplicate
items and ``map`` duplicate keys, as the API server does with 422.

Layout: :mod:`.source` (the file, the API names), :mod:`.schema` (OpenAPI with the
API server's semantics), :mod:`.cel` (rules and twins), :mod:`.validate` (both, in order).
"""

from __future__ import annotations

from .cel import (
    TWINS,
    CelEvaluator,
    CelRule,
    Twin,
    cel_errors,
    cel_rules,
)
from .schema import (
    detailed_schema_errors,
    pattern_matches,
    schema_errors,
    schema_valid,
)
from .source import (
    CRD_FILENAME,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    FieldError,
    crd_path,
    load_crd,
    version_schema,
)
from .validate import (
    iter_rule_texts,
    prune_nulls,
    root_errors,
    status_errors,
    validate_with_crd,
)

__all__ = [
    "CRD_FILENAME",
    "GROUP",
    "KIND",
    "PLURAL",
    "TWINS",
    "VERSION",
    "CelEvaluator",
    "CelRule",
    "FieldError",
    "Twin",
    "cel_errors",
    "cel_rules",
    "crd_path",
    "detailed_schema_errors",
    "iter_rule_texts",
    "load_crd",
    "pattern_matches",
    "prune_nulls",
    "root_errors",
    "schema_errors",
    "schema_valid",
    "status_errors",
    "validate_with_crd",
    "version_schema",
]
