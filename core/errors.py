"""Errors the pack raises for bad input. Every message names the fix."""


class EmergentSegError(ValueError):
    """Bad input or an unsupported model; the message is one actionable sentence."""


class UnsupportedModelError(EmergentSegError):
    """The model has no UNet self/cross-attention layout this pack understands."""


class Interrupted(RuntimeError):
    """The user cancelled a long computation."""
