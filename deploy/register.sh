#!/bin/sh
# Register every hospital public key in /keys with the SuperLink (the coordinator's step 3 of docs/deploy.md).
set -eu
: "${SUPERLINK:=server:8000}"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "study"

[superlink.study]
address = "$SUPERLINK"
root-certificates = "/certs/ca.crt"
TOML
for key in /keys/*.pub; do
    flwr supernode register "$key" study
done
