"""mailtls-operator: Postfix per-destination TLS policy as Kubernetes objects."""

__version__ = "0.1.0"
