"""The engine's progress/cancel interface on top of a QGIS Processing feedback."""
from __future__ import annotations

from geochange.engine.progress import Progress


class FeedbackProgress(Progress):
    def __init__(self, feedback):
        self._feedback = feedback

    def update(self, done: int, total: int) -> None:
        if total > 0:
            self._feedback.setProgress(100.0 * done / total)

    def log(self, message: str) -> None:
        self._feedback.pushInfo(message)

    def cancelled(self) -> bool:
        return self._feedback.isCanceled()
