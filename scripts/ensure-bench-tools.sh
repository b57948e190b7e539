#!/usr/bin/env bash
# Make sure the benchmark's peers and load generator exist (nginx, haproxy, wrk): install the missing ones
# with apt-get when possible. The packages' own services are not what the bench runs: it starts its own.
set -euo pipefail
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
[ ${#missing[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && sudo="sudo"; }
  if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
    echo "installing with apt-get: ${missing[*]}" >&2
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    exit 0
  fi
fi
echo "missing for make bench: ${missing[*]} (Debian/Ubuntu: apt-get install ${missing[*]})" >&2
exit 1
