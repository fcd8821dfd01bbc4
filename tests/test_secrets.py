from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import secrets as secrets_mod
from daemon.config import ApiConfig
from daemon.errors import ParleyError, SecretError
from daemon.secrets import (
    REDACTED,
    SecretFilter,
    install_secret_filter,
    load_api_key,
    redact,
)

KEY = "sk-proj-Abc123Def456Ghi789Jkl0"
OTHER = "sk-test-Zyx987Wvu654Tsr321Qpo0"


def cred(tmp_path: Path, content: str = KEY + "\n", mode: int = 0o400,
         name: str = "openai-api-key") -> Path:
    d = tmp_path / "creds"
    d.mkdir(exist_ok=True)
    f = d / name
    f.write_text(content)
    f.chmod(mode)
    return d


def api(source: str = "auto") -> ApiConfig:
    return ApiConfig(key_source=source)  # type: ignore[arg-type]


def assert_no_key(exc: BaseException) -> None:
    assert KEY not in str(exc) and OTHER not in str(exc)


# --- loading ------------------------------------------------------------------------------


def test_credential_read_and_stripped(tmp_path: Path) -> None:
    d = cred(tmp_path, "  " + KEY + "\r\n\n")
    assert load_api_key(api("credential"), {"CREDENTIALS_DIRECTORY": str(d)}) == KEY


@pytest.mark.parametrize("mode", [0o400, 0o440, 0o600, 0o640])
def test_systemd_like_modes_accepted(tmp_path: Path, mode: int) -> None:
    d = cred(tmp_path, mode=mode)
    assert load_api_key(api("credential"), {"CREDENTIALS_DIRECTORY": str(d)}) == KEY


@pytest.mark.parametrize(
    ("mode", "words"),
    [(0o644, "every user"), (0o604, "every user"), (0o602, "every user"), (0o660, "group")],
)
def test_unsafe_modes_refused(tmp_path: Path, mode: int, words: str) -> None:
    d = cred(tmp_path, mode=mode)
    with pytest.raises(SecretError) as info:
        load_api_key(api("credential"), {"CREDENTIALS_DIRECTORY": str(d)})
    msg = str(info.value)
    assert words in msg and f"{mode:04o}" in msg
    assert "LoadCredential=" in msg and "chmod 600" in msg
    assert_no_key(info.value)


def test_auto_does_not_fall_back_to_env_past_an_unsafe_file(tmp_path: Path) -> None:
    d = cred(tmp_path, mode=0o644)
    with pytest.raises(SecretError):
        load_api_key(api("auto"), {"CREDENTIALS_DIRECTORY": str(d), "OPENAI_API_KEY": OTHER})


def test_file_owned_by_another_user_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = cred(tmp_path, mode=0o400)
    path = d / "openai-api-key"
    if os.geteuid() == 0:
        os.chown(path, 4242, -1)  # neither us (root) nor root
    else:  # pretend to be someone else; the file stays owned by the real user
        real = os.geteuid()
        monkeypatch.setattr(secrets_mod.os, "geteuid", lambda: real + 1)
    with pytest.raises(SecretError, match="owned by uid") as info:
        load_api_key(api("credential"), {"CREDENTIALS_DIRECTORY": str(d)})
    assert_no_key(info.value)


def test_root_owned_credential_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # systemd's ACL variant: 0400 root-owned, readable by the service user through an ACL.
    d = cred(tmp_path, mode=0o440)
    if os.geteuid() != 0:
        pytest.skip("needs root to create a root-owned file")
    monkeypatch.setattr(secrets_mod.os, "geteuid", lambda: 999)
    assert load_api_key(api("credential"), {"CREDENTIALS_DIRECTORY": str(d)}) == KEY


def test_credential_source_without_directory(tmp_path: Path) -> None:
    with pytest.raises(SecretError) as info:
        load_api_key(api("credential"), {"OPENAI_API_KEY": KEY})
    msg = str(info.value)
    assert "CREDENTIALS_DIRECTORY" in msg and "systemd-creds" in msg
    assert_no_key(info.value)


def test_missing_credential_names_path_and_present_names(tmp_path: Path) -> None:
    d = cred(tmp_path, name="openai-key")
    with pytest.raises(SecretError) as info:
        load_api_key(api("credential"), {"CREDENTIALS_DIRECTORY": str(d)})
    msg = str(info.value)
    assert str(d / "openai-api-key") in msg and "present: openai-key" in msg
    assert_no_key(info.value)


def test_env_source(tmp_path: Path) -> None:
    assert load_api_key(api("env"), {"OPENAI_API_KEY": f" {KEY}\n"}) == KEY
    custom = ApiConfig(key_source="env", env_var="MY_KEY")
    assert load_api_key(custom, {"MY_KEY": KEY}) == KEY
    with pytest.raises(SecretError, match="MY_KEY is not set"):
        load_api_key(custom, {"OPENAI_API_KEY": KEY})
    with pytest.raises(SecretError, match="empty"):
        load_api_key(api("env"), {"OPENAI_API_KEY": "   "})


def test_env_source_ignores_credentials(tmp_path: Path) -> None:
    d = cred(tmp_path)
    assert load_api_key(api("env"), {"CREDENTIALS_DIRECTORY": str(d), "OPENAI_API_KEY": OTHER}) \
        == OTHER


def test_auto_prefers_credential_then_env(tmp_path: Path) -> None:
    d = cred(tmp_path)
    both = {"CREDENTIALS_DIRECTORY": str(d), "OPENAI_API_KEY": OTHER}
    assert load_api_key(api("auto"), both) == KEY
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert load_api_key(api("auto"), {"CREDENTIALS_DIRECTORY": str(empty_dir),
                                      "OPENAI_API_KEY": OTHER}) == OTHER
    assert load_api_key(api("auto"), {"OPENAI_API_KEY": OTHER}) == OTHER


def test_auto_missing_everywhere(tmp_path: Path) -> None:
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(SecretError) as info:
        load_api_key(api("auto"), {"CREDENTIALS_DIRECTORY": str(empty_dir)})
    msg = str(info.value)
    assert "'openai-api-key'" in msg and str(empty_dir) in msg
    assert "OPENAI_API_KEY (not set)" in msg
    assert "LoadCredentialEncrypted=openai-api-key" in msg and "systemd-creds" in msg
    assert isinstance(info.value, ParleyError)
    with pytest.raises(SecretError, match=r"\$CREDENTIALS_DIRECTORY is not set"):
        load_api_key(api("auto"), {})


def test_none_source() -> None:
    assert load_api_key(api("none"), {"OPENAI_API_KEY": KEY}) is None


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("\n  \n", "empty"),
        (KEY + "\n" + OTHER + "\n", "whitespace or control"),
        ("sk-a b", "whitespace or control"),
    ],
)
def test_malformed_key_files(tmp_path: Path, content: str, words: str) -> None:
    d = cred(tmp_path, content)
    with pytest.raises(SecretError, match=words) as info:
        load_api_key(api("credential"), {"CREDENTIALS_DIRECTORY": str(d)})
    assert_no_key(info.value)


def test_binary_key_file_hints_encryption(tmp_path: Path) -> None:
    d = tmp_path / "creds"
    d.mkdir()
    f = d / "openai-api-key"
    f.write_bytes(b"\xff\xfe\x00Wq\x81")
    f.chmod(0o400)
    with pytest.raises(SecretError, match="LoadCredentialEncrypted"):
        load_api_key(api("credential"), {"CREDENTIALS_DIRECTORY": str(d)})


def test_directory_instead_of_file(tmp_path: Path) -> None:
    d = tmp_path / "creds"
    (d / "openai-api-key").mkdir(parents=True, mode=0o700)
    with pytest.raises(SecretError, match="not a regular file"):
        load_api_key(api("credential"), {"CREDENTIALS_DIRECTORY": str(d)})


# --- redaction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        (f"Authorization: Bearer {KEY}", KEY),
        ("authorization: bearer ey.abc.def-ghi", "ey.abc.def-ghi"),
        ("api-key: 0123456789abcdef", "0123456789abcdef"),
        ("{'api-key': '0123456789abcdef'}", "0123456789abcdef"),
        ("key is sk-abcdefghijklmnop, ok", "sk-abcdefghijklmnop"),
        ("ephemeral ek_68ab12cd34ef56gh", "ek_68ab12cd34ef56gh"),
        ("custom secret hunter2-long here", "hunter2-long"),
    ],
)
def test_redact(text: str, gone: str) -> None:
    out = redact(text, ["hunter2-long"])
    assert gone not in out and REDACTED in out


def test_redact_leaves_ordinary_text_and_is_idempotent() -> None:
    plain = "task-force ask-questions skew, api key missing, Bearer"
    assert redact(plain) == plain
    once = redact(f"api-key: abcdefgh Bearer {KEY}")
    assert redact(once) == once
    assert once == f"api-key: {REDACTED} Bearer {REDACTED}"


def test_short_secrets_are_ignored() -> None:
    assert redact("a b c", ["a", ""]) == "a b c"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, SecretFilter]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s %(extra_field)s"))
    logger = logging.getLogger("test_secrets_capture")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    flt = install_secret_filter(["my-own-secret-value"], logger)
    yield logger, stream, flt
    logger.handlers = []


def test_filter_redacts_message_args_extra(
    captured: tuple[logging.Logger, io.StringIO, SecretFilter],
) -> None:
    logger, stream, flt = captured
    flt.add(KEY)
    logger.info(f"key in message {KEY}", extra={"extra_field": "x"})
    logger.info("key in args %s and %r", KEY, {"h": "my-own-secret-value"},
                extra={"extra_field": "x"})
    logger.info("header", extra={"extra_field": f"Bearer {OTHER}"})
    out = stream.getvalue()
    assert KEY not in out and OTHER not in out and "my-own-secret-value" not in out
    assert out.count(REDACTED) >= 4
    assert "key in args" in out and "header" in out


def test_filter_redacts_exception_traceback(
    captured: tuple[logging.Logger, io.StringIO, SecretFilter],
) -> None:
    logger, stream, flt = captured
    flt.add(KEY)

    def connect(key: str) -> None:
        raise ConnectionError(f"handshake failed with key {key}")

    try:
        connect(KEY)
    except ConnectionError:
        logger.exception("connect failed", extra={"extra_field": "x"})
    out = stream.getvalue()
    assert "Traceback" in out and "ConnectionError" in out and "handshake failed" in out
    assert KEY not in out


def test_filter_on_handler_sees_propagated_records() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger("parent_for_secret_test")
    root.handlers = [handler]
    root.propagate = False
    handler.addFilter(SecretFilter([KEY]))
    child = logging.getLogger("parent_for_secret_test.child.grandchild")
    child.warning("leak %s", KEY)
    root.handlers = []
    assert KEY not in stream.getvalue() and REDACTED in stream.getvalue()


def test_filter_survives_bad_format_args(
    captured: tuple[logging.Logger, io.StringIO, SecretFilter],
) -> None:
    logger, stream, flt = captured
    flt.add(KEY)
    logger.error("two %s %s", KEY, extra={"extra_field": "x"})  # one arg missing
    out = stream.getvalue()
    assert KEY not in out and "unformattable" in out


def test_filter_never_drops_records() -> None:
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    assert SecretFilter().filter(rec) is True
    assert rec.getMessage() == "hello world"
