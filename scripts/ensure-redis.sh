#!/usr/bin/env bash
# Make sure a redis-server binary exists: install it with apt-get when missing and possible.
set -euo pipefail
command -v redis-server >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && sudo="sudo"; }
  if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
    echo "redis-server not found: installing it with apt-get" >&2
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
    command -v redis-server >/dev/null 2>&1 && exit 0
  fi
fi
echo "redis-server is missing and could not be installed here." >&2
echo "Install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)," >&2
echo "or point REDIS_URL at a running Redis for 'make run'." >&2
exit 1
