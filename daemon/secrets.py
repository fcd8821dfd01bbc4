"""The API key: loaded from a systemd credential or the environment, and kept out of logs.

Production: systemd puts the key in ``$CREDENTIALS_DIRECTORY/<api.credential_name>``
(``LoadCredential=`` or ``LoadCredentialEncrypted=``). Those files are mode 0400, owned by
the service user, or owned by root with an ACL granting the service user read access
(``stat`` then shows mode 0440 because the ACL mask lives in the group bits). Development:
the ``OPENAI_API_KEY`` environment variable (``api.env_var``).

No message or exception here ever contains the key itself.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from daemon.config import ApiConfig
from daemon.errors import SecretError

logger = logging.getLogger(__name__)

REDACTED = "[REDACTED]"
MIN_SECRET_LEN = 4
_MAX_KEY_BYTES = 64 * 1024

_HOW_TO = (
    "Under systemd store the key as a credential, e.g. "
    "`systemd-creds encrypt --name={name} key.txt /etc/credstore.encrypted/{name}` and "
    "`LoadCredentialEncrypted={name}` in the unit (or `LoadCredential={name}:/path/to/keyfile` "
    "with the file chmod 600); for development export {env}=<key>"
)


def _how_to(api: ApiConfig) -> str:
    return _HOW_TO.format(name=api.credential_name, env=api.env_var)


def load_api_key(api: ApiConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key according to ``api.key_source``; None for ``none`` (local test server).

    Raises SecretError when the key is missing, unreadable, unsafe or malformed; the
    message says where parley looked and how to provide the key, never the key itself.
    """
    env = os.environ if environ is None else environ
    source = api.key_source
    if source == "none":
        return None
    creds_dir = env.get("CREDENTIALS_DIRECTORY", "")
    cred_path = Path(creds_dir) / api.credential_name if creds_dir else None

    if source == "credential":
        if cred_path is None:
            raise SecretError(
                f"api.key_source is 'credential' but $CREDENTIALS_DIRECTORY is not set, so "
                f"there is no systemd credential {api.credential_name!r} (parley is not "
                f"running under systemd with a credential). {_how_to(api)}"
            )
        return _read_credential(cred_path, api)

    if source == "auto" and cred_path is not None and os.path.lexists(cred_path):
        return _read_credential(cred_path, api)

    if source in ("env", "auto"):
        value = env.get(api.env_var, "")
        if value.strip():
            return _check_key(value.strip(), f"environment variable {api.env_var}")
        if source == "env":
            raise SecretError(
                f"api.key_source is 'env' but the environment variable {api.env_var} is "
                f"{'empty' if api.env_var in env else 'not set'}. {_how_to(api)}"
            )
        looked = (
            f"the systemd credential {api.credential_name!r} in {creds_dir} (not there"
            f"{_listing(Path(creds_dir))})"
            if creds_dir
            else f"the systemd credential {api.credential_name!r} ($CREDENTIALS_DIRECTORY "
            "is not set)"
        )
        raise SecretError(
            f"no OpenAI API key: looked for {looked} and the environment variable "
            f"{api.env_var} ({'empty' if api.env_var in env else 'not set'}). {_how_to(api)}"
        )
    raise SecretError(  # pragma: no cover - config validation rejects other values
        f"api.key_source {source!r} is not one of auto, credential, env, none"
    )


def _listing(directory: Path) -> str:
    """Names (never contents) of the credentials that are there, to spot a misnamed one."""
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError:
        return ""
    return f"; present: {', '.join(names)}" if names else "; the directory is empty"


def _read_credential(path: Path, api: ApiConfig) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise SecretError(
            f"the systemd credential {api.credential_name!r} is missing: {path} does not "
            f"exist{_listing(path.parent)}. {_how_to(api)}"
        ) from None
    except OSError as exc:
        raise SecretError(
            f"cannot open the API key file {path}: {exc.strerror}. Make it readable by the "
            f"service user (systemd's LoadCredential= does this). {_how_to(api)}"
        ) from None
    try:
        st = os.fstat(fd)
        _check_file(path, st)
        data = os.read(fd, _MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise SecretError(f"cannot read the API key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_BYTES:
        raise SecretError(
            f"the API key file {path} is larger than {_MAX_KEY_BYTES} bytes; it must hold "
            "only the key"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(
            f"the API key file {path} is not UTF-8 text (is it still encrypted? use "
            "LoadCredentialEncrypted=, not LoadCredential=, for systemd-creds output)"
        ) from None
    if not text.strip():
        raise SecretError(f"the API key file {path} is empty; put the key in it. {_how_to(api)}")
    return _check_key(text.strip(), f"the API key file {path}")


def _check_file(path: Path, st: os.stat_result) -> None:
    """Refuse a key file other users could read or change."""
    if not stat.S_ISREG(st.st_mode):
        raise SecretError(f"the API key file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    fix = (
        "Let systemd provide it (LoadCredential= or LoadCredentialEncrypted=), or "
        f"`chmod 600 {path}` and make it owned by the service user"
    )
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        raise SecretError(
            f"refusing the API key file {path}: it is owned by uid {st.st_uid}, neither the "
            f"service user (uid {euid}) nor root, so someone else controls it. {fix}"
        )
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise SecretError(
            f"refusing the API key file {path}: mode {mode:04o} lets every user on the "
            f"device {'read' if mode & stat.S_IROTH else 'change'} it. {fix}"
        )
    if mode & stat.S_IWGRP:
        raise SecretError(
            f"refusing the API key file {path}: mode {mode:04o} lets its group change it. {fix}"
        )


_BAD_KEY_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")


def _check_key(key: str, where: str) -> str:
    if _BAD_KEY_CHARS.search(key):
        raise SecretError(
            f"the API key in {where} contains whitespace or control characters inside it; "
            "it must hold exactly one key on one line"
        )
    if len(key) < MIN_SECRET_LEN:
        raise SecretError(f"the API key in {where} is too short to be a key")
    return key


# --- redaction --------------------------------------------------------------------------

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{4,}"), r"\1" + REDACTED),
    (
        re.compile(r"(?i)(\bapi[-_]key['\"]?\s*[:=]\s*['\"]?)(?!\[REDACTED\])[^\s'\",;}\]]+"),
        r"\1" + REDACTED,
    ),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), REDACTED),
    (re.compile(r"\bek_[A-Za-z0-9_-]{8,}"), REDACTED),
)


def _secrets_pattern(secrets: Iterable[str]) -> re.Pattern[str] | None:
    kept = sorted({s for s in secrets if len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in kept)) if kept else None


def _apply(text: str, pattern: re.Pattern[str] | None) -> str:
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    for regex, replacement in _PATTERNS:
        text = regex.sub(replacement, text)
    return text


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with each secret (4+ characters) and anything key-shaped replaced.

    Key-shaped: ``Bearer <token>``, ``sk-...``, ``ek_...`` and ``api-key: <value>``.
    """
    return _apply(text, _secrets_pattern(secrets))


# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


class SecretFilter(logging.Filter):
    """Redacts secrets from a record's message, args, exception, stack and extra fields.

    Install it on every handler (``handler.addFilter``): a filter on a logger does not
    see records propagated from child loggers. It formats the message itself (so secrets
    in ``args`` are caught) and replaces ``exc_info`` by redacted ``exc_text``. Always
    returns True: nothing is dropped, only rewritten.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: tuple[str, ...] = tuple(secrets)
        self._pattern = _secrets_pattern(self._secrets)

    def add(self, secret: str) -> None:
        """Also redact ``secret`` from now on (e.g. a key loaded after logging started)."""
        self._secrets = (*self._secrets, secret)
        self._pattern = _secrets_pattern(self._secrets)

    def redact(self, text: str) -> str:
        return _apply(text, self._pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        pattern = self._pattern
        try:
            message = record.getMessage()
        except Exception:  # bad format args: keep both, redacted, instead of failing later
            message = f"{record.msg!s} (unformattable arguments: {record.args!r})"
        record.msg = _apply(message, pattern)
        record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = _apply(record.exc_text, pattern)
        if record.stack_info:
            record.stack_info = _apply(record.stack_info, pattern)
        for key, value in list(record.__dict__.items()):
            if key in _STANDARD_ATTRS or value is None or isinstance(value, (bool, int, float)):
                continue
            text = value if isinstance(value, str) else str(value)
            cleaned = _apply(text, pattern)
            if cleaned != text:
                setattr(record, key, cleaned)
        return True


def install_secret_filter(
    secrets: Iterable[str] = (), logger_: logging.Logger | None = None
) -> SecretFilter:
    """Add one SecretFilter to every handler of ``logger_`` (default: the root logger)."""
    flt = SecretFilter(secrets)
    for handler in (logger_ or logging.getLogger()).handlers:
        handler.addFilter(flt)
    return flt
