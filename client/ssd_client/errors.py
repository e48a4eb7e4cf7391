"""The client's exceptions: one base class, one subclass per thing a user can get wrong."""

from __future__ import annotations


class SSDClientError(Exception):
    """Anything the client cannot do; the message is one line meant for the user."""


class ServerUnavailableError(SSDClientError):
    """The server cannot be reached, is not live/ready, dropped the connection or timed out (after the
    client's retries, where they apply)."""


class ModelNotFoundError(SSDClientError):
    """The server does not serve (or has not loaded) the requested model."""


class ModelMismatchError(SSDClientError):
    """The model exists but its inputs/outputs are not those of the SSD300 or the Mask R-CNN ensemble."""


class ImageError(SSDClientError):
    """An input image that cannot be read, encoded or decoded; the message names it."""


class InferenceError(SSDClientError):
    """The server rejected an inference request."""
