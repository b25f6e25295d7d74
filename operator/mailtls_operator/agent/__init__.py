"""The ``agent`` strategy: a sidecar in each Postfix pod converges it, no ``pods/exec``.

Modules: :mod:`.desired` (the ConfigMaps -> a checked revision, pure),
:mod:`.converge` (install, lint, queue, probes through the same argv and
rollout code as the ``exec`` strategy), :mod:`.runner` (argv as local
subprocesses), :mod:`.api` (get/watch ConfigMaps, patch the own pod),
:mod:`.loop` (API first, mounted volume as fallback, report),
:mod:`.report` (the pod annotations, both sides), :mod:`.collect` (the
operator reading them), :mod:`.cli` (``mailtls agent``).  DESIGN.md §11,
docs/agent.md.
"""
