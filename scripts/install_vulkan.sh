#!/usr/bin/env bash
# Installs a software Vulkan driver (Mesa lavapipe) that ManiSkill 3 / SAPIEN accept on a machine
# without a GPU, and prints the path of its ICD file (export it as VK_ICD_FILENAMES).
#
# SAPIEN needs a Vulkan device even for state observations. Debian bookworm's own Mesa 22 lavapipe
# is rejected ("Failed to find a supported physical device"); Mesa 25 from bookworm-backports works.
# Safe to run again: when a new enough lavapipe is already installed it only prints the path.
# Needs root (apt-get) on Debian bookworm.
set -euo pipefail

MIN_MESA_MAJOR=24
SOURCES=/etc/apt/sources.list.d/bookworm-backports.sources

find_icd() {
    local f
    for f in /usr/share/vulkan/icd.d/lvp_icd.x86_64.json /usr/share/vulkan/icd.d/lvp_icd.*.json \
        /usr/share/vulkan/icd.d/lvp_icd.json; do
        if [[ -f $f ]]; then
            echo "$f"
            return 0
        fi
    done
    return 1
}

mesa_major() {
    local v
    v=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)
    # Versions look like "25.0.7-2~bpo12+1"; keep the part before the first dot.
    echo "${v%%.*}"
}

is_ready() {
    local major
    major=$(mesa_major)
    [[ -n $major && $major =~ ^[0-9]+$ && $major -ge $MIN_MESA_MAJOR ]] && find_icd >/dev/null
}

if is_ready; then
    echo "[install_vulkan] Mesa $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers) lavapipe already installed" >&2
    find_icd
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "[install_vulkan] needs root to run apt-get; rerun with sudo." >&2
    exit 1
fi
if ! grep -q 'VERSION_CODENAME=bookworm' /etc/os-release; then
    echo "[install_vulkan] written for Debian bookworm; install Mesa >= $MIN_MESA_MAJOR lavapipe" \
        "(mesa-vulkan-drivers) with your distribution's package manager instead." >&2
    exit 1
fi

if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # Use the same Debian mirror the machine already uses for bookworm.
    mirror=$(awk '/^URIs:/ {u = $2} /^Suites:.*bookworm( |$)/ {print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    if [[ -z $mirror ]]; then
        mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    if [[ -z $mirror ]]; then
        echo "[install_vulkan] no bookworm apt source found to derive a backports source from;" \
            "add bookworm-backports to your apt sources and rerun." >&2
        exit 1
    fi
    echo "[install_vulkan] adding the bookworm-backports apt source ($SOURCES)" >&2
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
        "$mirror" /usr/share/keyrings/debian-archive-keyring.gpg >"$SOURCES"
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
# libdrm comes from backports too: the backported Mesa needs a newer one than bookworm ships.
apt-get install -y -q --no-install-recommends -t bookworm-backports \
    mesa-vulkan-drivers libdrm2 libdrm-common libvulkan1 >&2

if ! is_ready; then
    echo "[install_vulkan] mesa-vulkan-drivers $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null)" \
        "installed but no lavapipe ICD >= $MIN_MESA_MAJOR found under /usr/share/vulkan/icd.d" >&2
    exit 1
fi
echo "[install_vulkan] installed Mesa $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers) lavapipe" >&2
find_icd
