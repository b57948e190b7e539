#!/usr/bin/env bash
# Make sure Debian's prometheus package (the server and promtool) exists for tests/deploy: the alert rules
# are checked and unit-tested by promtool, then loaded by a real Prometheus that scrapes a test gateway.
# Installed with apt-get when missing and possible; the package's own service is never started by the
# tests (they run their own server on a free loopback port with a temporary data directory).
set -euo pipefail
PROMETHEUS="${PROMETHEUS:-/usr/bin/prometheus}"
PROMTOOL="${PROMTOOL:-/usr/bin/promtool}"
[ -x "$PROMETHEUS" ] && [ -x "$PROMTOOL" ] && exit 0
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && sudo="sudo"; }
  if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
    echo "prometheus/promtool not found: installing Debian's prometheus package with apt-get" >&2
    # --no-install-recommends: the server and promtool only, not the node exporter and web assets.
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      --no-install-recommends prometheus >/dev/null
    [ -x "$PROMETHEUS" ] && [ -x "$PROMTOOL" ] && exit 0
  fi
fi
echo "prometheus/promtool are missing and could not be installed here." >&2
echo "Install them (Debian/Ubuntu: apt-get install prometheus), or set PROMETHEUS and PROMTOOL." >&2
exit 1
