"""Errors raised by the processor. All are `ValueError` subclasses so callers can catch them broadly."""


class ProcessorError(ValueError):
    """Base class of every error the processor raises on bad input."""


class ImageCountError(ProcessorError):
    """The number of images differs from the number of image placeholders in the rendered prompts."""


class ImageLoadError(ProcessorError):
    """An image could not be read: missing, unreadable or corrupt file, or an unsupported image object."""


class UnsupportedContentError(ProcessorError):
    """A chat message or content item has an unsupported shape or type."""


class PromptTooLongError(ProcessorError):
    """A tokenised prompt is longer than the allowed `max_length`."""


class ProcessorConfigError(ProcessorError):
    """A processor directory is missing files or has invalid settings."""
