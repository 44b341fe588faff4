#!/bin/sh
# Register hospitals' public keys with the SuperLink (step 4 of docs/deploy.md), on the server machine:
#   register.sh [KEYS_DIR]    every KEYS_DIR/*.pub (default /pubkeys, the compose file's volume)
# SUPERLINK: the SuperLink's own address (default 127.0.0.1:9093; the hospitals' door refuses registrations).
# CA: the study's ca.crt (default /certs/ca.crt). Flower's CLI (flwr) must be on PATH.
set -eu
keys="${1:-/pubkeys}"
: "${SUPERLINK:=127.0.0.1:9093}"
: "${CA:=/certs/ca.crt}"
ca="$(realpath "$CA")"  # Flower wants an absolute path
FLWR_HOME="$(mktemp -d)"
export FLWR_HOME FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
trap 'rm -rf "$FLWR_HOME"' EXIT
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "study"

[superlink.study]
address = "$SUPERLINK"
root-certificates = "$ca"
TOML
found=0
failed=0
for key in "$keys"/*.pub; do
    [ -e "$key" ] || continue
    found=1
    flwr supernode register "$key" study || failed=1
done
if [ "$found" = 0 ]; then
    echo "register.sh: no .pub files in $keys" >&2
    exit 2
fi
exit "$failed"
