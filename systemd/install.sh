#!/usr/bin/env bash
# Install or uninstall parley as a systemd service. Called by systemd/Makefile:
#   install.sh install     (as root on the device, or with DESTDIR=... for packaging)
#   install.sh uninstall   (PURGE=1 also removes /etc/parley, /var/lib/parley and the user)
#
# Environment: DESTDIR (packaging root; empty = this machine), PYTHON (interpreter for the
# venv, default python3), PREFIX (/opt/parley), CONFDIR (/etc/parley), UNITDIR
# (/etc/systemd/system), PURGE (uninstall), PIP_OPTS (extra pip options, e.g. --no-index
# --find-links=DIR for an offline install).
#
# With DESTDIR set nothing outside DESTDIR is touched: no apt-get, no useradd, no chown, no
# systemctl. The venv is built inside DESTDIR and then relocated to PREFIX (script shebangs,
# activate scripts and byte-code paths), so it is correct once the tree is copied to /.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/.." && pwd)

DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
PYTHON=${PYTHON:-python3}
PREFIX=${PREFIX:-/opt/parley}
CONFDIR=${CONFDIR:-/etc/parley}
UNITDIR=${UNITDIR:-/etc/systemd/system}
STATEDIR=/var/lib/parley
PURGE=${PURGE:-0}
PIP_OPTS=${PIP_OPTS:-}
USER_NAME=parley
DEB_PACKAGES=(python3-venv python3-dev libasound2-dev libsystemd-dev pkg-config gcc)

venv="$DESTDIR$PREFIX/venv"
unit="$DESTDIR$UNITDIR/parley.service"
conf="$DESTDIR$CONFDIR/config.yaml"

cleanup=()
trap 'rm -rf "${cleanup[@]}"' EXIT

say() { printf '%s\n' "parley-install: $*"; }
die() { printf '%s\n' "parley-install: error: $*" >&2; exit 1; }

live() { [ -z "$DESTDIR" ]; }
systemd_running() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

need_root() {
    if live && [ "$(id -u)" != 0 ]; then
        die "installing on this machine needs root: sudo make install (or set DESTDIR=...)"
    fi
}

system_packages() {
    local missing=() p
    for p in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing system packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
}

system_user() {
    # Raspberry Pi OS has a gpio group (owner of /dev/gpiochip*); plain Debian may not.
    getent group audio >/dev/null || groupadd --system audio
    getent group gpio >/dev/null || groupadd --system gpio
    if getent passwd "$USER_NAME" >/dev/null; then
        usermod -a -G audio,gpio "$USER_NAME"
    else
        say "creating system user $USER_NAME (groups audio, gpio)"
        useradd --system --user-group --groups audio,gpio --home-dir "$STATEDIR" \
            --no-create-home --shell /usr/sbin/nologin \
            --comment "parley voice assistant" "$USER_NAME"
    fi
}

build_venv() {
    local stage wheel
    say "venv $PREFIX/venv (python: $PYTHON)"
    mkdir -p "$DESTDIR$PREFIX"
    # An existing venv is reused: a running service keeps working while it is upgraded.
    if [ ! -x "$venv/bin/python" ]; then
        "$PYTHON" -m venv "$venv"
    fi
    # Build from a copy, so neither build/ nor *.egg-info lands in the source tree.
    stage=$(mktemp -d)
    cleanup+=("$stage")
    mkdir -p "$stage/src" "$stage/wheels"
    tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
        --exclude='*.egg-info' --exclude='__pycache__' --exclude='*.so' --exclude='*.o' \
        --exclude='./.*_cache' -cf - . | tar -C "$stage/src" -xf - --no-same-owner
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip wheel -q --disable-pip-version-check $PIP_OPTS --no-deps \
        -w "$stage/wheels" "$stage/src"
    wheel=$(ls "$stage"/wheels/parley-*.whl)
    # Dependencies as needed, then the project itself even if the version did not change.
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q --disable-pip-version-check $PIP_OPTS "$wheel"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q --disable-pip-version-check $PIP_OPTS \
        --no-deps --force-reinstall "$wheel"
    if [ -n "$DESTDIR" ]; then
        relocate_venv
    fi
}

relocate_venv() {
    # Paths baked in at build time say $DESTDIR$PREFIX; on the target they must say $PREFIX.
    local f
    for f in "$venv"/bin/* "$venv/pyvenv.cfg"; do
        [ -f "$f" ] && [ ! -L "$f" ] || continue
        if grep -Iq -- "$DESTDIR$PREFIX" "$f" 2>/dev/null; then
            sed -i "s#$DESTDIR$PREFIX#$PREFIX#g" "$f"
        fi
    done
    # Byte-code records its source path (shown in tracebacks): recompile with the final one.
    "$venv/bin/python" -m compileall -q -f -j 0 -s "$DESTDIR" -p / "$venv/lib" >/dev/null
}

install_files() {
    install -d -m 0755 "$DESTDIR$UNITDIR"
    local encrypted=()
    if [ -e "$DESTDIR$CONFDIR/openai-api-key.cred" ]; then
        # An encrypted credential exists: the unit loads that one instead of the plain file.
        encrypted=(-e 's|^LoadCredential=openai-api-key:|#LoadCredential=openai-api-key:|'
                   -e 's|^#LoadCredentialEncrypted=openai-api-key:|LoadCredentialEncrypted=openai-api-key:|')
        say "using the encrypted credential $CONFDIR/openai-api-key.cred"
    fi
    sed -e "s#/opt/parley/#$PREFIX/#g" "${encrypted[@]}" "$here/parley.service" >"$unit.tmp"
    chmod 0644 "$unit.tmp"
    mv -f "$unit.tmp" "$unit"
    say "unit $UNITDIR/parley.service"

    if [ -f "$src/README.md" ]; then
        install -m 0644 "$src/README.md" "$DESTDIR$PREFIX/README.md"
    fi

    install -d -m 0750 "$DESTDIR$CONFDIR"
    if [ -e "$conf" ]; then
        say "kept existing $CONFDIR/config.yaml (the new default is $PREFIX/config.yaml.default)"
    else
        install -m 0640 "$src/config.yaml" "$conf"
        say "config $CONFDIR/config.yaml"
    fi
    install -m 0644 "$src/config.yaml" "$DESTDIR$PREFIX/config.yaml.default"
    if live; then
        chown root:"$USER_NAME" "$DESTDIR$CONFDIR" "$conf"
    fi
}

instructions() {
    cat <<EOF

parley is installed. Next steps:

 1. Put the OpenAI API key into a credential (root-only; never the config or environment):
      systemd-ask-password -n "OpenAI API key:" | sudo install -m 600 /dev/stdin $CONFDIR/openai-api-key
    or encrypted with this machine's credential key (protects copies of $CONFDIR; on a Pi
    without TPM it does not protect a stolen SD card):
      systemd-ask-password -n "OpenAI API key:" | sudo systemd-creds encrypt --name=openai-api-key - $CONFDIR/openai-api-key.cred
    and run 'sudo make install' again: with $CONFDIR/openai-api-key.cred present it
    installs the unit with LoadCredentialEncrypted= instead of LoadCredential=.
 2. Review $CONFDIR/config.yaml (audio devices, button pin), then check it:
      sudo -u $USER_NAME $PREFIX/venv/bin/parley check-config $CONFDIR/config.yaml
 3. Start it now and at every boot, and watch it:
      sudo systemctl enable --now parley
      journalctl -u parley -f
 Exit status 78 means a bad config or a refused API key: systemd will not restart it until
 you fix that and run 'sudo systemctl restart parley'.
EOF
}

do_install() {
    need_root
    [ -f "$src/config.yaml" ] || die "no config.yaml in $src"
    if live; then
        system_packages
        system_user
    fi
    build_venv
    install_files
    if live && systemd_running; then
        systemctl daemon-reload
        # An upgrade: restart only if it is running.
        systemctl try-restart parley.service || true
    fi
    if live; then
        if ! runuser -u "$USER_NAME" -- "$venv/bin/parley" check-config "$conf" >/dev/null; then
            say "warning: $CONFDIR/config.yaml does not validate; see: $PREFIX/venv/bin/parley check-config $conf"
        fi
        instructions
    else
        say "laid out under $DESTDIR (no users, packages or systemctl touched)"
    fi
}

do_uninstall() {
    need_root
    if live && systemd_running; then
        systemctl disable --now parley.service 2>/dev/null || true
    fi
    case "$PREFIX" in
        /?*) ;;
        *) die "refusing to remove PREFIX='$PREFIX' (must be an absolute path other than /)" ;;
    esac
    rm -f "$unit"
    rm -rf "$DESTDIR$PREFIX"
    # Drop-ins made by `systemctl edit parley`
    rm -rf "$DESTDIR$UNITDIR/parley.service.d"
    if live && systemd_running; then
        systemctl daemon-reload
        systemctl reset-failed parley.service 2>/dev/null || true
    fi
    say "removed $UNITDIR/parley.service and $PREFIX"
    if [ "$PURGE" = 1 ]; then
        rm -rf "$DESTDIR$CONFDIR" "$DESTDIR$STATEDIR" "$DESTDIR/var/lib/private/parley"
        say "PURGE=1: removed $CONFDIR (config and API key) and $STATEDIR (history, usage)"
        if live && getent passwd "$USER_NAME" >/dev/null; then
            userdel "$USER_NAME" 2>/dev/null || true
            say "PURGE=1: removed user $USER_NAME"
        fi
    else
        say "kept $CONFDIR (config and API key credential) and $STATEDIR (history, usage)"
        say "and the $USER_NAME user; 'make uninstall PURGE=1' removes them too"
    fi
}

case "${1:-}" in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) die "usage: install.sh install|uninstall" ;;
esac
