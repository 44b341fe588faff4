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
    # A key registered before (by hand, or an earlier run of this script) is reported and skipped.
    if out="$(flwr supernode register "$key" study 2>&1)"; then
        printf '%s\n' "$out"
    elif printf '%s' "$out" | grep -q "already in use"; then
        echo "register.sh: $key: already registered"
    else
        printf '%s\n' "$out" >&2
        echo "register.sh: $key: NOT registered" >&2
        failed=1
    fi
done
if [ "$found" = 0 ]; then
    echo "register.sh: no .pub files in $keys" >&2
    exit 2
fi
exit "$failed"
