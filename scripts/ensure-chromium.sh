#!/usr/bin/env bash
# Make sure Debian's headless-capable chromium exists for the console's browser tests
# (tests/gateway/console): install it with apt-get when missing and possible. Playwright drives this
# binary (executable_path); it never downloads browsers of its own.
set -euo pipefail
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
[ -x "$CHROMIUM" ] && exit 0
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && sudo="sudo"; }
  if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
    echo "chromium not found: installing it with apt-get" >&2
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
    [ -x "$CHROMIUM" ] && exit 0
  fi
fi
echo "chromium is missing and could not be installed here." >&2
echo "Install it (Debian/Ubuntu: apt-get install chromium), or set CHROMIUM to a Chromium binary." >&2
exit 1
