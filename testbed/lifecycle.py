"""The context-manager side of the test bed's clusters: ``with Cluster(...) as c`` is
``c.start()`` then ``c.stop()`` in any case."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class StartStop:
    """A context manager over ``start()`` (returns the object) and ``stop()`` (idempotent)."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
