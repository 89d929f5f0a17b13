"""Errors a bad adapter raises. Subclasses of ValueError: they are the caller's fault."""


class LoRAError(ValueError):
    """An adapter cannot be used; the message names the adapter and the fix."""


class LoRANotFoundError(LoRAError):
    """The adapter's files are missing (path or hub id does not resolve)."""
