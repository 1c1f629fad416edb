#!/usr/bin/env bash
# Headless checks of what a person looks at: Chromium renders the run's index.html
# (tests/test_index_html.py) and napari opens the OME-Zarr (tests/test_napari.py), which needs
# a virtual X display (Xvfb) with software OpenGL (Mesa) and the XCB and font libraries Qt loads.
set -euo pipefail
packages=(chromium fonts-dejavu-core xvfb xauth libgl1-mesa-dri libgl1 libegl1 libopengl0 libglib2.0-0
    libdbus-1-3 libfontconfig1 libxkbcommon0 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
    libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xinerama0 libxcb-xkb1 libx11-xcb1 libxrender1 libxi6)
if dpkg -s "${packages[@]}" >/dev/null 2>&1; then
    echo "chromium and the libraries Qt needs are installed"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"
