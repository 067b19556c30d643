#!/usr/bin/env bash
# Installs the real tus clients that tests/tests/tus_clients.rs drives, idempotently (a second
# run only checks stamps and takes well under a second):
#   - npm: tus-js-client and selenium-webdriver, exactly as package-lock.json pins them, into
#     tests/clients/node_modules (`npm ci`, with npm's download cache in tests/clients/.cache);
#   - PyPI: tuspy (pinned below) into the venv tests/clients/.venv (pip's cache in .cache too);
#   - Debian: chromium and chromium-driver, when /usr/bin/chromium or /usr/bin/chromedriver
#     is missing (needs root and apt-get; `apt-get update` only if the install fails without).
# Everything but the Debian packages stays inside tests/clients (all of it gitignored).
# Exits non-zero, saying what is missing or what failed, when something cannot be installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
TUSPY_VERSION=1.1.0
cache="$here/.cache"
log="$cache/setup.log"

fail() {
    echo "tests/clients/setup.sh: $*" >&2
    exit 1
}

mkdir -p "$cache"
# One setup at a time (two test runs, or CI's step and a test, may start it together).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache/setup.lock"
    flock 9
fi

# Runs a command with its output in the log; on failure shows the log and stops.
quietly() {
    local what="$1"
    shift
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        fail "$what failed (command: $*)"
    fi
}

# --- npm: tus-js-client, selenium-webdriver ---------------------------------------------
command -v node >/dev/null 2>&1 || fail "node is missing (Node.js 20 or newer; Debian: apt-get install nodejs npm)"
command -v npm >/dev/null 2>&1 || fail "npm is missing (Debian: apt-get install npm)"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || fail "node $(node --version) is too old: tus-js-client and selenium-webdriver need 20 or newer"
npm_stamp="node_modules/.upgate-setup"
npm_want="$(sha256sum package-lock.json | cut -d' ' -f1) node-$node_major"
if [ "$(cat "$npm_stamp" 2>/dev/null)" != "$npm_want" ] || [ ! -f node_modules/tus-js-client/dist/tus.min.js ]; then
    echo "tests/clients/setup.sh: npm ci (tus-js-client, selenium-webdriver)" >&2
    quietly "npm ci" npm ci --no-audit --no-fund --loglevel=error --cache "$cache/npm"
    [ -f node_modules/tus-js-client/dist/tus.min.js ] || fail "npm ci left no tus-js-client browser bundle"
    echo "$npm_want" >"$npm_stamp"
fi

# --- PyPI: tuspy ----------------------------------------------------------------------------
venv="$here/.venv"
py_ok() {
    "$venv/bin/python" - "$TUSPY_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
from importlib.util import find_spec
# Found without importing it (tuspy imports aiohttp: most of a second).
sys.exit(find_spec("tusclient") is None or version("tuspy") != sys.argv[1])
EOF
}
if [ ! -x "$venv/bin/python" ] || ! py_ok; then
    echo "tests/clients/setup.sh: pip install tuspy==$TUSPY_VERSION into tests/clients/.venv" >&2
    python="$(command -v python3 || true)"
    [ -n "$python" ] || fail "python3 is missing (Debian: apt-get install python3 python3-venv)"
    # A venv whose interpreter no longer runs (its base Python moved) is made anew.
    if ! "$venv/bin/python" -c '' >/dev/null 2>&1; then
        rm -rf "$venv"
        quietly "python3 -m venv (Debian: apt-get install python3-venv)" "$python" -m venv "$venv"
    fi
    quietly "pip install tuspy==$TUSPY_VERSION" env PIP_CACHE_DIR="$cache/pip" PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$venv/bin/python" -m pip install --quiet "tuspy==$TUSPY_VERSION"
    "$venv/bin/python" -c 'import tusclient.client' >"$log" 2>&1 && py_ok ||
        { cat "$log" >&2; fail "tuspy $TUSPY_VERSION does not import from $venv after pip install"; }
fi

# --- Debian: chromium, chromium-driver ----------------------------------------------------
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        fail "/usr/bin/chromium or /usr/bin/chromedriver is missing; install them (Debian, as root: apt-get install chromium chromium-driver)"
    fi
    echo "tests/clients/setup.sh: apt-get install chromium chromium-driver" >&2
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver
    }
    if ! apt_install >"$log" 2>&1; then
        echo "tests/clients/setup.sh: apt-get install failed; apt-get update, then again" >&2
        quietly "apt-get update" apt-get update -qq
        quietly "apt-get install chromium chromium-driver" apt_install
    fi
    [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] ||
        fail "apt-get install chromium chromium-driver left no /usr/bin/chromium or /usr/bin/chromedriver"
fi

echo "tests/clients/setup.sh: ok (tus-js-client, selenium-webdriver, tuspy $TUSPY_VERSION, $(/usr/bin/chromium --version 2>/dev/null || echo chromium))" >&2
