#!/bin/sh
# Upgrade the edgeml agent itself, rolling back when the new agent does not come up healthy.
# Installed on devices as /usr/local/sbin/edgeml-upgrade by firmware/install.sh.
#
#   edgeml-upgrade [--find-links DIR] NEW_WHEEL
#
# 1. builds a fresh venv in the idle slot (/opt/edgeml/venv-a or venv-b) and installs
#    NEW_WHEEL there (dependencies from the wheel's directory and the index; with
#    --find-links DIR from DIR only, offline); checks that it imports; nothing on the
#    running agent changes until then;
# 2. flips /opt/edgeml/current to that slot with one rename (atomic: a power cut leaves
#    either the old or the new link, never none) and restarts the unit;
# 3. polls the agent's health until HEALTH_TIMEOUT; healthy: done (exit 0). Otherwise
#    stops the unit, has the new agent rewrite its telemetry buffer in the format the old
#    one reads (edgeml agent downgrade-buffer), flips the link back, resets and restarts
#    the unit, and exits 1 (3 if the old agent is not healthy either). The failed slot
#    stays on disk for inspection.
#
# Environment (each has a default for a real device):
#   DESTDIR          root the agent is installed in (default /)
#   SYSTEMCTL        command used as systemctl (default systemctl)
#   UNIT             the unit (default edgeml-agent.service)
#   HEALTH_CMD       shell command; exit 0 = healthy (default: GET HEALTH_URL answers 200,
#                    or 503 "no model" when the agent had no model before the upgrade either)
#   HEALTH_URL       default http://127.0.0.1:8470/v1/health
#   HEALTH_TIMEOUT   seconds to wait for health after a restart (default 90)
#   HEALTH_INTERVAL  seconds between polls (default 2)
#   PYTHON           interpreter for the new venv (default: the one the active venv uses)
#   AGENT_CONFIG     the agent's settings, for converting its telemetry buffer back on a
#                    rollback (default /etc/edgeml/agent.yaml)
#   PIP_*            passed to pip as usual (PIP_NO_DEPS=1, PIP_INDEX_URL=...)
set -eu

DESTDIR=${DESTDIR:-}
[ "$DESTDIR" = / ] && DESTDIR=
SYSTEMCTL=${SYSTEMCTL:-systemctl}
UNIT=${UNIT:-edgeml-agent.service}
HEALTH_URL=${HEALTH_URL:-http://127.0.0.1:8470/v1/health}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-90}
HEALTH_INTERVAL=${HEALTH_INTERVAL:-2}
OPT=$DESTDIR/opt/edgeml
AGENT_CONFIG=${AGENT_CONFIG:-$DESTDIR/etc/edgeml/agent.yaml}

say() { printf 'edgeml-upgrade: %s\n' "$*"; }
die() { printf 'edgeml-upgrade: error: %s\n' "$*" >&2; exit "${2:-2}"; }

FIND_LINKS=
WHEEL=
while [ $# -gt 0 ]; do
    case $1 in
        --find-links) [ $# -ge 2 ] || die "--find-links needs a directory"; FIND_LINKS=$2; shift ;;
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option: $1" ;;
        *) [ -z "$WHEEL" ] || die "one wheel only"; WHEEL=$1 ;;
    esac
    shift
done
[ -n "$WHEEL" ] || die "usage: edgeml-upgrade [--find-links DIR] NEW_WHEEL"
[ -f "$WHEEL" ] || die "no wheel at $WHEEL"
[ -L "$OPT/current" ] || die "$OPT/current is not a symlink: install with firmware/install.sh first"

mkdir "$OPT/.upgrade.lock" 2>/dev/null || die "another upgrade is running (remove $OPT/.upgrade.lock if not)"
trap 'rmdir "$OPT/.upgrade.lock" 2>/dev/null || true' EXIT INT TERM

OLD=$(readlink "$OPT/current")
case $OLD in
    venv-a) NEW=venv-b ;;
    *) NEW=venv-a ;;
esac

link_current() { # atomic: rename(2) of a fresh link over the old one
    ln -sfn "$1" "$OPT/.current.tmp"
    mv -T "$OPT/.current.tmp" "$OPT/current"
}

log_state() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $*" >>"$OPT/upgrade.log"; }

http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$HEALTH_URL" 2>/dev/null || true; }

healthy() {
    if [ -n "${HEALTH_CMD:-}" ]; then
        sh -c "$HEALTH_CMD" >/dev/null 2>&1
        return
    fi
    "$SYSTEMCTL" is-active --quiet "$UNIT" || return 1
    code=$(http_code)
    [ "$code" = 200 ] && return 0
    # The agent serves but has no model: healthy only if it had none before either.
    [ "$code" = 503 ] && [ "$BEFORE" != 200 ]
}

wait_healthy() {
    waited=0
    while :; do
        if healthy; then return 0; fi
        [ "$waited" -lt "$HEALTH_TIMEOUT" ] || return 1
        sleep "$HEALTH_INTERVAL"
        waited=$((waited + HEALTH_INTERVAL))
    done
}

restart() {
    "$SYSTEMCTL" reset-failed "$UNIT" >/dev/null 2>&1 || true
    "$SYSTEMCTL" restart "$UNIT" || say "restart of $UNIT failed"
}

# ---- 1. build the new venv beside the running one ----------------------------------------
if [ -z "${PYTHON:-}" ]; then
    home=$(sed -n 's/^home *= *//p' "$OPT/$OLD/pyvenv.cfg" 2>/dev/null || true)
    PYTHON=python3
    if [ -n "$home" ] && [ -x "$DESTDIR$home/python3" ]; then PYTHON=$DESTDIR$home/python3; fi
fi
site=
if grep -q '^include-system-site-packages *= *true' "$OPT/$OLD/pyvenv.cfg" 2>/dev/null; then
    site=--system-site-packages
fi
BEFORE=$(if [ -z "${HEALTH_CMD:-}" ]; then http_code; fi)

say "installing $(basename "$WHEEL") into $OPT/$NEW (active: $OLD)"
rm -rf "${OPT:?}/$NEW"
# shellcheck disable=SC2086 # $site is empty or one flag
"$PYTHON" -m venv $site "$OPT/$NEW" || die "could not create $OPT/$NEW"
set -- --disable-pip-version-check --no-input --no-compile --ignore-installed --find-links "${FIND_LINKS:-$(dirname "$WHEEL")}"
if [ -n "$FIND_LINKS" ]; then set -- "$@" --no-index; fi
"$OPT/$NEW/bin/python" -m pip install "$@" "$WHEEL" || die "pip could not install $WHEEL; the agent was not touched"
if [ -n "$DESTDIR" ]; then
    for f in "$OPT/$NEW"/bin/*; do
        if [ -f "$f" ] && [ ! -L "$f" ] && head -n 1 "$f" | grep -q "^#!$DESTDIR/"; then
            sed -i "1s|^#!$DESTDIR/|#!/|" "$f"
        fi
    done
fi
"$OPT/$NEW/bin/python" -c 'import edgeml.cli' || die "the new agent does not import; the agent was not touched"

# ---- 2. flip and restart -------------------------------------------------------------------
link_current "$NEW"
log_state "switch $OLD -> $NEW ($(basename "$WHEEL"))"
say "switched $OPT/current -> $NEW; restarting $UNIT"
restart

# ---- 3. health, or roll back ---------------------------------------------------------------
if wait_healthy; then
    log_state "healthy on $NEW"
    say "upgrade done: $NEW is healthy (previous agent kept in $OPT/$OLD)"
    exit 0
fi
say "the new agent is not healthy within ${HEALTH_TIMEOUT}s: rolling back to $OLD"
"$SYSTEMCTL" stop "$UNIT" || say "stop of $UNIT failed"
# the new agent may have written telemetry in a format the old one cannot read
if "$OPT/$NEW/bin/python" -m edgeml.cli agent downgrade-buffer --help >/dev/null 2>&1; then
    "$OPT/$NEW/bin/python" -m edgeml.cli agent downgrade-buffer --config "$AGENT_CONFIG" \
        || say "warning: the telemetry buffer could not be converted for $OLD"
fi
link_current "$OLD"
log_state "rollback $NEW -> $OLD"
restart
if wait_healthy; then
    log_state "healthy on $OLD after rollback"
    die "upgrade rolled back: $OLD is running again ($OPT/$NEW kept for inspection)" 1
fi
log_state "unhealthy on $OLD after rollback"
die "upgrade rolled back to $OLD, but it is not healthy either" 3
