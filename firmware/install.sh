#!/bin/sh
# Install the edgeml device agent as a systemd service on a Debian-based device
# (Raspberry Pi OS, Ubuntu on Jetson, x86 gateways), or into any root (DESTDIR).
#
#   [DESTDIR=/path] firmware/install.sh [--wheel PATH] [--find-links DIR] [--config FILE]
#                                       [--profile NAME] [--system-site-packages]
#                                       [--no-venv] [--no-enable]
#   [DESTDIR=/path] firmware/install.sh --uninstall [--purge]
#
# Layout (under DESTDIR):
#   /opt/edgeml/venv-a, venv-b    two virtual-environment slots (upgrade.sh fills the idle one)
#   /opt/edgeml/current           symlink to the active slot; the unit runs current/bin/edgeml
#   /etc/edgeml/agent.yaml        config (root:edgeml 0640); never overwritten once present
#   /var/lib/edgeml               data: telemetry buffer and models (edgeml:edgeml 0750)
#   /lib/systemd/system/edgeml-agent.service, enabled for multi-user.target
#   /usr/local/sbin/edgeml-upgrade  the self-upgrade with rollback (firmware/upgrade.sh)
# Logs go to the journal (stderr); journald rotates them, so no logrotate file.
#
# Environment: DESTDIR (default /), PYTHON (interpreter for the venv, default python3);
# PIP_* variables reach pip as usual (PIP_NO_DEPS=1, PIP_INDEX_URL=...).
# --uninstall removes the unit, the venvs and the upgrade tool, keeping config, data and
# the service user; --purge removes those too.
set -eu

SERVICE=edgeml-agent.service
SVC_USER=edgeml
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")

DESTDIR=${DESTDIR:-}
[ "$DESTDIR" = / ] && DESTDIR=
PYTHON=${PYTHON:-python3}

WHEEL=
FIND_LINKS=
CONFIG=
PROFILE=
NO_VENV=0
NO_ENABLE=0
SYSTEM_SITE=0
MODE=install
PURGE=0

say() { printf 'edgeml-install: %s\n' "$*"; }
die() { printf 'edgeml-install: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -eu/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case $1 in
        --wheel) [ $# -ge 2 ] || die "--wheel needs a path"; WHEEL=$2; shift ;;
        --find-links) [ $# -ge 2 ] || die "--find-links needs a directory"; FIND_LINKS=$2; shift ;;
        --config) [ $# -ge 2 ] || die "--config needs a file"; CONFIG=$2; shift ;;
        --profile) [ $# -ge 2 ] || die "--profile needs a name"; PROFILE=$2; shift ;;
        --no-venv) NO_VENV=1 ;;
        --no-enable) NO_ENABLE=1 ;;
        --system-site-packages) SYSTEM_SITE=1 ;;
        --uninstall) MODE=uninstall ;;
        --purge) PURGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
    shift
done
[ "$PURGE" = 1 ] && [ "$MODE" != uninstall ] && die "--purge goes with --uninstall"

OPT=$DESTDIR/opt/edgeml
ETC=$DESTDIR/etc/edgeml
DATA=$DESTDIR/var/lib/edgeml
UNIT_DIR=$DESTDIR/lib/systemd/system
WANTS=$DESTDIR/etc/systemd/system/multi-user.target.wants
UPGRADE_TOOL=$DESTDIR/usr/local/sbin/edgeml-upgrade

is_root() { [ "$(id -u)" = 0 ]; }
# systemd is running this system (not a chroot, a container without it, or a DESTDIR).
live_systemd() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

# ---- service user -------------------------------------------------------------------
# In a DESTDIR the account files are edited directly (no useradd there: it may be
# another architecture's image, or a bare scratch root).
free_system_id() { # $1: field-3 files to avoid; prints a free id in 100..999, highest first
    n=999
    while [ "$n" -ge 100 ]; do
        if ! cut -d: -f3 "$@" 2>/dev/null | grep -qx "$n"; then echo "$n"; return 0; fi
        n=$((n - 1))
    done
    return 1
}

ensure_user() {
    if [ -z "$DESTDIR" ]; then
        if ! getent group "$SVC_USER" >/dev/null; then groupadd --system "$SVC_USER"; fi
        if ! getent passwd "$SVC_USER" >/dev/null; then
            useradd --system --gid "$SVC_USER" --home-dir /var/lib/edgeml --no-create-home \
                --shell /usr/sbin/nologin --comment "edgeml agent" "$SVC_USER"
        fi
        return 0
    fi
    mkdir -p "$DESTDIR/etc"
    touch "$DESTDIR/etc/passwd" "$DESTDIR/etc/group"
    if ! grep -q "^$SVC_USER:" "$DESTDIR/etc/group"; then
        gid=$(free_system_id "$DESTDIR/etc/group") || die "no free system gid in $DESTDIR/etc/group"
        echo "$SVC_USER:x:$gid:" >>"$DESTDIR/etc/group"
        [ -f "$DESTDIR/etc/gshadow" ] && echo "$SVC_USER:!::" >>"$DESTDIR/etc/gshadow"
    fi
    gid=$(grep "^$SVC_USER:" "$DESTDIR/etc/group" | cut -d: -f3)
    if ! grep -q "^$SVC_USER:" "$DESTDIR/etc/passwd"; then
        uid=$gid
        if cut -d: -f3 "$DESTDIR/etc/passwd" | grep -qx "$uid"; then
            uid=$(free_system_id "$DESTDIR/etc/passwd") || die "no free system uid in $DESTDIR/etc/passwd"
        fi
        echo "$SVC_USER:x:$uid:$gid:edgeml agent:/var/lib/edgeml:/usr/sbin/nologin" >>"$DESTDIR/etc/passwd"
        [ -f "$DESTDIR/etc/shadow" ] && echo "$SVC_USER:!*:$(( $(date +%s) / 86400 )):::::" >>"$DESTDIR/etc/shadow"
    fi
    return 0
}

user_ids() { # prints "uid gid" of the service user (from DESTDIR's files when set)
    if [ -z "$DESTDIR" ]; then
        echo "$(id -u "$SVC_USER") $(getent group "$SVC_USER" | cut -d: -f3)"
    else
        echo "$(grep "^$SVC_USER:" "$DESTDIR/etc/passwd" | cut -d: -f3) $(grep "^$SVC_USER:" "$DESTDIR/etc/group" | cut -d: -f3)"
    fi
}

own() { # own OWNER:GROUP(numeric) PATH: chown when root, otherwise warn once
    if is_root; then chown "$1" "$2"; else say "not root: leaving $2 owned by $(id -un)"; fi
}

# ---- virtual environment ---------------------------------------------------------------
make_venv() { # make_venv DIR: a venv at DIR with the agent installed
    venv=$1
    rm -rf "$venv"
    if [ "$SYSTEM_SITE" = 1 ]; then
        "$PYTHON" -m venv --system-site-packages "$venv"
    else
        "$PYTHON" -m venv "$venv"
    fi
    set -- --disable-pip-version-check --no-input --no-compile --ignore-installed
    if [ -n "$FIND_LINKS" ]; then set -- "$@" --no-index --find-links "$FIND_LINKS"; fi
    if [ -n "$WHEEL" ]; then
        [ -f "$WHEEL" ] || die "no wheel at $WHEEL"
        [ -n "$FIND_LINKS" ] || set -- "$@" --find-links "$(dirname "$WHEEL")"
        set -- "$@" "$WHEEL"
    elif [ -f "$REPO/pyproject.toml" ]; then
        set -- "$@" "$REPO"
    else
        set -- "$@" edgeml
    fi
    "$venv/bin/python" -m pip install "$@"
    fix_shebangs "$venv"
    "$venv/bin/python" -c 'import edgeml' || die "the agent does not import in $venv"
}

fix_shebangs() { # a venv built under DESTDIR names DESTDIR in its scripts; the device must not
    [ -n "$DESTDIR" ] || return 0
    for f in "$1"/bin/*; do
        if [ -f "$f" ] && [ ! -L "$f" ] && head -n 1 "$f" | grep -q "^#!$DESTDIR/"; then
            sed -i "1s|^#!$DESTDIR/|#!/|" "$f"
        fi
    done
    if [ -f "$1/pyvenv.cfg" ]; then sed -i "s|$DESTDIR/opt/edgeml/|/opt/edgeml/|g" "$1/pyvenv.cfg"; fi
}

link_current() { # atomically point OPT/current at slot $1 (a relative link: valid in DESTDIR too)
    ln -sfn "$1" "$OPT/.current.tmp"
    mv -T "$OPT/.current.tmp" "$OPT/current"
}

# ---- config ----------------------------------------------------------------------------
install_config() {
    mkdir -p "$ETC"
    chmod 0750 "$ETC"
    own "0:$gid" "$ETC"
    if [ -e "$ETC/agent.yaml" ]; then
        say "keeping existing $ETC/agent.yaml"
        [ -z "$PROFILE" ] || say "note: --profile $PROFILE not applied to the existing config (set hardware_profile there)"
        return 0
    fi
    src=${CONFIG:-$REPO/configs/agent.yaml}
    [ -f "$src" ] || die "no config to install: $src"
    tmp=$ETC/.agent.yaml.tmp
    if [ -n "$CONFIG" ]; then
        cp "$src" "$tmp"
    else
        # The shipped file documents every key; its example device id and broker are not
        # this device's: the device id defaults to the host name, the broker to discovery.
        sed -e 's|^data_dir:.*|data_dir: /var/lib/edgeml|' \
            -e 's|^device_id:|# device_id:|' \
            -e 's|^broker_url:|# broker_url:|' \
            "$src" >"$tmp"
    fi
    if [ -n "$PROFILE" ]; then
        if grep -q '^hardware_profile:' "$tmp"; then
            sed -i "s|^hardware_profile:.*|hardware_profile: $PROFILE|" "$tmp"
        else
            echo "hardware_profile: $PROFILE" >>"$tmp"
        fi
    fi
    chmod 0640 "$tmp"
    own "0:$gid" "$tmp"
    mv "$tmp" "$ETC/agent.yaml"
    say "installed $ETC/agent.yaml"
}

# ---- install ---------------------------------------------------------------------------
do_install() {
    [ -n "$DESTDIR" ] || is_root || die "installing on this system needs root (or set DESTDIR)"
    if [ -n "$PROFILE" ] && [ -d "$REPO/configs/hardware" ] && [ ! -f "$REPO/configs/hardware/$PROFILE.yaml" ]; then
        die "unknown hardware profile '$PROFILE' (known: $(find "$REPO/configs/hardware/" -name '*.yaml' -exec basename {} .yaml \; | sort | tr '\n' ' '))"
    fi
    ensure_user
    ids=$(user_ids)
    uid=${ids% *}
    gid=${ids#* }
    if [ -z "$uid" ] || [ -z "$gid" ]; then die "service user $SVC_USER not found after creating it"; fi

    install_config

    mkdir -p "$DATA"
    chmod 0750 "$DATA"
    own "$uid:$gid" "$DATA"

    mkdir -p "$OPT"
    if [ "$NO_VENV" = 0 ]; then
        slot="venv-a"
        if [ -L "$OPT/current" ] && [ "$(readlink "$OPT/current")" = venv-a ]; then slot="venv-b"; fi
        say "creating $OPT/$slot"
        make_venv "$OPT/$slot"
        link_current "$slot"
        say "agent: $OPT/current -> $slot"
    else
        say "--no-venv: no virtual environment (the unit expects $OPT/current/bin/edgeml)"
    fi

    mkdir -p "$UNIT_DIR"
    install -m 0644 "$HERE/edgeml-agent.service" "$UNIT_DIR/$SERVICE"
    mkdir -p "$(dirname "$UPGRADE_TOOL")"
    install -m 0755 "$HERE/upgrade.sh" "$UPGRADE_TOOL"

    if [ "$NO_ENABLE" = 0 ]; then
        if live_systemd; then
            systemctl daemon-reload
            systemctl enable "$SERVICE"
            if [ "$NO_VENV" = 0 ]; then systemctl restart "$SERVICE"; fi
        else
            mkdir -p "$WANTS"
            ln -sfn "/lib/systemd/system/$SERVICE" "$WANTS/$SERVICE"
        fi
    fi
    say "installed into ${DESTDIR:-/}"
}

# ---- uninstall -------------------------------------------------------------------------
do_uninstall() {
    [ -n "$DESTDIR" ] || is_root || die "uninstalling from this system needs root (or set DESTDIR)"
    if live_systemd; then systemctl disable --now "$SERVICE" 2>/dev/null || true; fi
    rm -f "$WANTS/$SERVICE" "$UNIT_DIR/$SERVICE" "$UPGRADE_TOOL"
    rm -rf "$OPT"
    # Leftovers of older installs that logged to a file.
    rm -f "$DESTDIR/etc/logrotate.d/edgeml"
    if live_systemd; then systemctl daemon-reload; fi
    if [ "$PURGE" = 1 ]; then
        rm -rf "$ETC" "$DATA" "$DESTDIR/etc/systemd/system/$SERVICE.d" "$DESTDIR/etc/default/edgeml-agent"
        if [ -z "$DESTDIR" ]; then
            if getent passwd "$SVC_USER" >/dev/null; then userdel "$SVC_USER"; fi
            if getent group "$SVC_USER" >/dev/null; then groupdel "$SVC_USER"; fi
        else
            for f in passwd group shadow gshadow; do
                if [ -f "$DESTDIR/etc/$f" ]; then sed -i "/^$SVC_USER:/d" "$DESTDIR/etc/$f"; fi
            done
        fi
        say "purged config, data and the $SVC_USER user from ${DESTDIR:-/}"
    else
        say "uninstalled from ${DESTDIR:-/}; kept $ETC and $DATA (--purge removes them)"
    fi
}

if [ "$MODE" = uninstall ]; then do_uninstall; else do_install; fi
