# Sourced by scripts/demo and scripts/test: a virtual environment with edgeml installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${EDGEML_VENV:-.venv}"
if ! command -v mosquitto >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing mosquitto (Debian package)..." >&2
    apt-get install -y -q mosquitto mosquitto-clients >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q mosquitto mosquitto-clients >/dev/null; }
  else
    echo "note: mosquitto is not installed (sudo apt install mosquitto mosquitto-clients)" >&2
  fi
fi
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (Debian package, for the console's browser tests)..." >&2
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; } \
    || echo "note: chromium could not be installed: the browser tests will be skipped" >&2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV ..." >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
fi
stamp="$VENV/.edgeml-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing edgeml[dev,train] into $VENV (torch pinned by constraints.txt) ..." >&2
  "$VENV/bin/pip" install -q -c constraints.txt -e '.[dev,train]' >&2
  touch "$stamp"
fi
