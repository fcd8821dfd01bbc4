"""The one root exception type for parley.

Every error parley raises on purpose derives from :class:`ParleyError`. Messages say
what was wrong and what to do about it, and never contain a secret.
"""

from __future__ import annotations


class ParleyError(Exception):
    """Root of every error parley raises on purpose."""


class ConfigError(ParleyError):
    """The configuration is invalid; the message names the key path and what is allowed."""


class SecretError(ParleyError):
    """The API key could not be obtained safely."""


class AudioDeviceError(ParleyError):
    """An ALSA device could not be opened or used."""


class SessionError(ParleyError):
    """The Realtime session failed in a way the daemon reports."""


class FatalApiError(SessionError):
    """The API refused us for a reason retrying cannot fix (bad key, no quota, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class ToolError(ParleyError):
    """A tool call could not be carried out."""
