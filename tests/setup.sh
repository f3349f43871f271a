#!/bin/sh
# Prepare this machine for the test suite, with or without apt-get and root:  sh tests/setup.sh && python -m pytest
#
# 1. Debian packages the tests prefer: dataset-fashion-mnist (the real Fashion-MNIST in
#    /usr/share/datasets/fashion-mnist) and chromium + chromium-driver (the browser test of difflab serve). All three
#    installed: apt is skipped. Else, with apt-get and root (or password-less sudo), they are installed. Else (macOS,
#    conda, a laptop without root) nothing is installed: Fashion-MNIST comes from difflab's own downloader (into its
#    cache, MD5-checked) and the browser test uses the Chrome or Chromium this system has.
# 2. pip install torch==2.13.0 -e ".[test]" (any arguments given to this script are passed on to pip).
# 3. Load Fashion-MNIST once through difflab's loader, which downloads it into the cache when no copy is found.
set -eu
cd "$(dirname "$0")/.."

PACKAGES="dataset-fashion-mnist chromium chromium-driver"

installed() {  # every named Debian package is installed (dpkg also knows removed ones: ask for their status)
    command -v dpkg-query >/dev/null 2>&1 || return 1
    for package in "$@"; do
        [ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null)" = "install ok installed" ] || return 1
    done
}

sudo=""     # what runs apt-get as root: nothing when we are root
can_apt=no  # apt-get is there and may be run as root
if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        can_apt=yes
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        can_apt=yes sudo="sudo -n"
    fi
fi

if installed $PACKAGES; then
    echo "setup: Debian packages $PACKAGES are installed"
elif [ "$can_apt" = yes ]; then
    if ! { $sudo apt-get update && $sudo apt-get install -y $PACKAGES; }; then
        echo "setup: warning: apt-get could not install $PACKAGES; going on without them" >&2
    fi
fi
if ! installed $PACKAGES; then  # say where the tests get what the packages would have given them
    data="difflab's own downloader for Fashion-MNIST (fetched into ${DIFFLAB_CACHE:-${HOME:-}/.cache/difflab}, MD5-checked)"
    if installed dataset-fashion-mnist; then data="Debian's dataset-fashion-mnist"; fi
    echo "setup: without Debian's $PACKAGES (no apt-get, no root, or apt failed): the tests use $data and" \
         "the system's Chrome/Chromium for the browser test"
fi

python -m pip install torch==2.13.0 -e ".[test]" "$@"

python -c '
from difflab.data import load_dataset

sizes = [len(load_dataset("fashion-mnist", split=split)) for split in ("train", "test")]
print(f"setup: Fashion-MNIST ready ({sizes[0]} train and {sizes[1]} test images)")
'
