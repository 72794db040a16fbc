"""Errors of the engines that mean "bad input or setup", importable without loading torch."""


class EngineError(ValueError):
    """An engine that does not exist or cannot be loaded; says what is available."""


class CheckpointError(ValueError):
    """A model folder or file that is missing or does not match the code; says what is expected."""
