#!/usr/bin/env bash
# Installs the headless browser that tests/test_error_page.py drives (Chromium, Debian/Ubuntu
# package `chromium`). Does nothing when CONTEXTBLIP_CHROMIUM is set or a Chromium / Chrome is
# on PATH. Otherwise installs it with apt-get, as root or through password-less sudo; when
# neither is possible it prints what to run and exits 0, so that the other tests still run
# (the browser test then fails and says how to install the browser).
set -uo pipefail

if [ -n "${CONTEXTBLIP_CHROMIUM:-}" ]; then
  echo "install_browser: CONTEXTBLIP_CHROMIUM=${CONTEXTBLIP_CHROMIUM}"
  exit 0
fi
for name in chromium chromium-browser google-chrome google-chrome-stable chrome; do
  if command -v "$name" >/dev/null 2>&1; then
    echo "install_browser: found $(command -v "$name")"
    exit 0
  fi
done

install='apt-get update && apt-get install -y --no-install-recommends chromium'
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get here; install Chromium with your package manager, or set" \
       "CONTEXTBLIP_CHROMIUM=/path/to/chromium (the browser test fails without one)" >&2
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  runner=(bash -c)
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  runner=(sudo -n bash -c)
else
  echo "install_browser: not root and no password-less sudo; run as root: $install" \
       "(or set CONTEXTBLIP_CHROMIUM=/path/to/chromium); the browser test fails without it" >&2
  exit 0
fi
echo "install_browser: $install"
if ! "${runner[@]}" "export DEBIAN_FRONTEND=noninteractive; $install"; then
  echo "install_browser: the installation failed; run: $install" >&2
fi
exit 0
