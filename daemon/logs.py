"""Logging set-up: journald with structured fields under systemd, plain stderr otherwise.

Structured fields travel in ``extra``::

    log.info("turn done", extra=fields(turn_id=t, session_id=s, latency_ms=412, tokens=980))

Under journald they become the journal fields ``TURN_ID=...`` and so on (``journalctl
TURN_ID=...`` finds a turn); on stderr they are appended as `` turn_id=... latency_ms=...``.

Two leaks are closed here: the ``websockets`` loggers are held at INFO or above whatever the
level (at DEBUG they print request headers, ``Authorization`` included), and every handler
carries the secret-redacting filter (``daemon.secrets.SecretFilter``) plus a last redaction
of the formatted text, so a key cannot reach the journal through the message, an exception
or a field.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

from daemon.errors import ConfigError
from daemon.secrets import SecretFilter

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: Loggers that must never log below INFO (they print secrets at DEBUG).
QUIET_LOGGERS = ("websockets",)

SYSLOG_IDENTIFIER = "parley"

# Journal field names: uppercase letters, digits and "_", not starting with a digit or "_".
_FIELD_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
# Fields our journal handler sets itself; an ``extra`` must not override them.
_RESERVED = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "LOGGER",
        "THREAD_NAME",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
    }
)

JournalSender = Callable[..., None]


def fields(**kw: object) -> dict[str, object]:
    """``extra=`` for structured fields: ``turn_id=...`` becomes ``TURN_ID``; None is left out.

    Raises ValueError for a name that is not a valid journal field or is one the handler
    sets itself (MESSAGE, PRIORITY, ...).
    """
    out: dict[str, object] = {}
    for key, value in kw.items():
        name = key.upper()
        if not _FIELD_NAME.match(name) or name in _RESERVED:
            raise ValueError(f"{key!r} cannot be a journal field name")
        if value is not None:
            out[name] = value
    return out


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The structured fields a record carries (its uppercase attributes), in order."""
    return {
        k: v for k, v in record.__dict__.items() if _FIELD_NAME.match(k) and k not in _RESERVED
    }


def _render(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=\\' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class _QuietFilter(logging.Filter):
    """Drops records below INFO from the quiet loggers, even if someone lowered their level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            return True
        return not any(
            record.name == q or record.name.startswith(q + ".") for q in QUIET_LOGGERS
        )


class TextFormatter(logging.Formatter):
    """``[time ]LEVEL logger: message key=value ...``; the final text is redacted again.

    ``timestamps=False`` under journald (it stamps every line itself); ``syslog_prefix``
    adds ``<N>`` priority prefixes that journald turns into the entry's priority.
    """

    def __init__(
        self,
        *,
        timestamps: bool,
        syslog_prefix: bool = False,
        redact: Callable[[str], str] = str,
    ) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s"
        if timestamps:
            fmt = "%(asctime)s.%(msecs)03d " + fmt
        super().__init__(fmt, datefmt="%Y-%m-%d %H:%M:%S")
        self._syslog_prefix = syslog_prefix
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = "".join(f" {k.lower()}={_render(v)}" for k, v in record_fields(record).items())
        if extra:
            head, sep, tail = text.partition("\n")
            text = head + extra + sep + tail
        text = self._redact(text)
        if self._syslog_prefix:
            prefix = f"<{_syslog_priority(record.levelno)}>"
            text = "\n".join(prefix + line for line in text.split("\n"))
        return text


def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFieldHandler(logging.Handler):
    """Sends each record to journald with only what we choose: no raw ``msg``/``args``.

    (python-systemd's own JournalHandler forwards every record attribute and the unformatted
    ``args`` as CODE_ARGS, which would bypass redaction.) ``sender`` is
    ``systemd.journal.send``, replaceable in tests.
    """

    def __init__(self, sender: JournalSender, redact: Callable[[str], str] = str) -> None:
        super().__init__()
        self._send = sender
        self._redact = redact
        # The message alone; the exception text is appended by the base formatter.
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self._redact(self.format(record))
            extra = {k: self._redact(str(v)) for k, v in record_fields(record).items()}
            message_id = getattr(record, "MESSAGE_ID", None)
            if message_id is not None:
                extra["MESSAGE_ID"] = str(message_id).replace("-", "")
            self._send(
                message,
                PRIORITY=str(_syslog_priority(record.levelno)),
                SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
                LOGGER=record.name,
                THREAD_NAME=record.threadName or "",
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
                **extra,
            )
        except Exception:
            self.handleError(record)


def under_journald(environ: Mapping[str, str], stream: TextIO) -> bool:
    """True when ``stream`` is the journal stream systemd connected (``$JOURNAL_STREAM``).

    The variable is inherited by children whose stderr goes elsewhere, so its
    ``device:inode`` must match the stream's, as sd_journal_stream_fd(3) advises.
    """
    value = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (OSError, ValueError, AttributeError):
        return False


def _journal_sender() -> JournalSender | None:
    try:
        import systemd.journal
    except ImportError:
        return None
    send: JournalSender = systemd.journal.send
    return send


_OURS = "_parley_handler"
# The secret filter of the current handler, for add_secret().
_active: list[SecretFilter] = []


def add_secret(secret: str) -> None:
    """Redact ``secret`` from now on (the API key is usually loaded after logging starts)."""
    for flt in _active:
        flt.add(secret)


def setup_logging(
    level: str,
    secrets: Sequence[str] = (),
    *,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    journal_sender: JournalSender | None = None,
) -> None:
    """Configure the root logger; safe to call again (e.g. on reload with a new level).

    ``environ``, ``stream`` (default ``sys.stderr``) and ``journal_sender`` (default
    ``systemd.journal.send``) are for tests.
    """
    try:
        levelno = LEVELS[level.lower()]
    except KeyError:
        raise ConfigError(
            f"log level {level!r} is not allowed; use one of {', '.join(LEVELS)}"
        ) from None
    env = os.environ if environ is None else environ
    out = sys.stderr if stream is None else stream
    # One filter per handler: it rewrites each record (message, args, exception, fields),
    # and its redact() is applied once more to the final text the handler emits.
    secret_filter = SecretFilter(secrets)
    redact = secret_filter.redact

    handler: logging.Handler
    journald = under_journald(env, out)
    sender = journal_sender if journal_sender is not None else _journal_sender()
    if journald and sender is not None:
        handler = JournalFieldHandler(sender, redact)
    else:
        handler = logging.StreamHandler(out)
        handler.setFormatter(
            TextFormatter(timestamps=not journald, syslog_prefix=journald, redact=redact)
        )
    setattr(handler, _OURS, True)
    handler.addFilter(secret_filter)
    handler.addFilter(_QuietFilter())
    _active[:] = [secret_filter]

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(levelno, logging.INFO))
