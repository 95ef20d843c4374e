"""The project's exceptions: each carries a one-line message meant for a person."""


class PaliGemmaError(Exception):
    """Base class of every error this package raises on purpose."""


class SettingError(PaliGemmaError, ValueError):
    """A generation or load setting outside its allowed range (names the setting and the range)."""


class ImageError(PaliGemmaError, ValueError):
    """An image that cannot be read: missing, not an image, corrupt, or too large."""


class PromptError(PaliGemmaError, ValueError):
    """A prompt that cannot be run, for example one longer than the model's context."""


class CheckpointError(PaliGemmaError):
    """A checkpoint folder or repo that cannot be loaded (names the file or tensor at fault)."""


class OutputError(PaliGemmaError):
    """An output file or folder that cannot be written."""
