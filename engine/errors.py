"""Errors the engine raises where the cause is known; workers turn them into API errors."""


class ModelLoadError(ValueError):
    """A model file is missing, broken, or does not match its config."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture is not one pdserve implements."""


class RequestError(ValueError):
    """A request the engine cannot run (too long, bad parameters)."""


class KVCacheFullError(RuntimeError):
    """No KV blocks are free for this request now (the caller may retry elsewhere or later)."""


class EngineDeadError(RuntimeError):
    """The engine failed (its loop raised, or a rank of its group died); every request in flight fails with this."""
