#!/usr/bin/env bash
# Check a unit file without a running systemd: `systemd-analyze verify` and
# `systemd-analyze security --offline=yes`. Fails if verify prints anything (it exits 0 on
# unknown keys and unparsable values, so its output is what counts) or if the overall
# exposure is above MAX_EXPOSURE (default 1.5).
#
# verify also checks that ExecStart= exists and is executable. /opt/parley is not installed
# on a build machine, so a copy of the unit is verified whose ExecStart= executable is a
# stub at a temporary path; everything else (arguments, every other directive, the
# ExecReload= command, dependencies) is verified as written. That the real path is what
# `make install` lays down is tested by tests/test_install.py.
set -euo pipefail

unit=${1:?usage: check-unit.sh UNIT_FILE}
max=${MAX_EXPOSURE:-1.5}
name=$(basename "$unit")

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-unit: systemd-analyze not found (apt-get install systemd)" >&2
    exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- verify --------------------------------------------------------------------------
exec_path=$(sed -n 's/^ExecStart=[-@:+!]*\([^ ]*\).*/\1/p' "$unit" | head -n1)
if [ -z "$exec_path" ]; then
    echo "check-unit: $unit has no ExecStart=" >&2
    exit 1
fi
mkdir -p "$tmp/bin" "$tmp/unit"
printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/stub"
chmod 755 "$tmp/bin/stub"
# Only the executable of the first ExecStart= line is replaced.
awk -v old="$exec_path" -v new="$tmp/bin/stub" '
    !done && /^ExecStart=/ { i = index($0, old); $0 = substr($0, 1, i - 1) new substr($0, i + length(old)); done = 1 }
    { print }' "$unit" >"$tmp/unit/$name"

echo "== systemd-analyze verify $name (ExecStart executable $exec_path -> stub)"
set +e
verify_out=$(cd "$tmp/unit" && SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no "./$name" 2>&1)
verify_rc=$?
set -e
verify_out=${verify_out//$tmp\/unit\//}
if [ -n "$verify_out" ]; then
    printf '%s\n' "$verify_out"
fi
if [ "$verify_rc" -ne 0 ] || [ -n "$verify_out" ]; then
    echo "check-unit: FAIL: systemd-analyze verify reported problems (rc=$verify_rc)" >&2
    exit 1
fi
echo "verify: OK (no output)"

# --- security ------------------------------------------------------------------------
echo "== systemd-analyze security --offline=yes $unit"
set +e
sec_out=$(SYSTEMD_COLORS=0 systemd-analyze security --offline=yes --no-pager "$unit" 2>&1)
sec_rc=$?
set -e
line=$(printf '%s\n' "$sec_out" | grep 'Overall exposure level' || true)
printf '%s\n' "$sec_out" | grep -E '✗|Overall' || true
if [ -z "$line" ]; then
    printf '%s\n' "$sec_out" >&2
    echo "check-unit: FAIL: no 'Overall exposure level' line (rc=$sec_rc)" >&2
    exit 1
fi
score=$(printf '%s\n' "$line" | sed -n 's/.*: \([0-9][0-9]*\.[0-9]\).*/\1/p')
if [ -z "$score" ]; then
    echo "check-unit: FAIL: cannot read the score from: $line" >&2
    exit 1
fi
if awk -v s="$score" -v m="$max" 'BEGIN { exit !(s > m) }'; then
    echo "check-unit: FAIL: exposure $score > $max" >&2
    exit 1
fi
echo "security: OK (exposure $score <= $max)"
