#!/bin/sh
# The README's commands: `./tox.sh -e bench` (the main job) and `./tox.sh` (the tests).
# Runs tox; on a machine that has only Python 3 and pip, first installs tox into
# .tox-bootstrap/ (a virtual environment beside this file, ignored by git).
set -eu
root=$(cd "$(dirname "$0")" && pwd)
if command -v tox >/dev/null 2>&1; then
    exec tox -c "$root/tox.ini" "$@"
fi
boot="$root/.tox-bootstrap"
if [ ! -x "$boot/bin/tox" ]; then
    echo "tox.sh: tox is not installed; installing it into $boot" >&2
    if python3 -m venv "$boot" 2>/dev/null; then
        "$boot/bin/python" -m pip install -q --disable-pip-version-check "tox>=4"
    else  # no venv module (e.g. Debian without python3-venv): a user install
        rm -rf "$boot"
        python3 -m pip install -q --user "tox>=4"
        exec python3 -m tox -c "$root/tox.ini" "$@"
    fi
fi
exec "$boot/bin/tox" -c "$root/tox.ini" "$@"
