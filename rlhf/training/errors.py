"""Errors the training library raises; services map them to status codes (rlhf.runtime.errors)."""

from __future__ import annotations


class TrainingError(Exception):
    """Base of the library's errors; the message says what to do and is safe to show to users."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelLoadError(TrainingError):
    """A model or tokenizer could not be loaded from the given hub id or folder."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class NotEnoughData(TrainingError):
    """Too little usable feedback to train on."""


class DeadlinePassed(TrainingError):
    """Work stopped because the caller's deadline passed."""
