#!/usr/bin/env bash
# Installs what building scand needs on a Debian machine: libclang for RocksDB's bindgen, cmake,
# OpenSSL and zlib for librdkafka, and a C++ toolchain. protoc is vendored by a crate; nothing else is needed to run the default.
# Also Debian's prometheus package, for promtool: CI checks the alert rules and scrape config with it;
# and PyPI's protobuf, whose json_format the tests hold scand's proto3 JSON against.
set -euo pipefail
need=()
for pkg in libclang-dev cmake libssl-dev zlib1g-dev libcurl4-openssl-dev pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
if ! command -v promtool >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # Only promtool is used; the server's recommended extras are not needed.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus
fi
if ! python3 -c "import google.protobuf" >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check protobuf
fi
