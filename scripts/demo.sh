#!/usr/bin/env bash
# Starts one local Butterfly node on the embedded default: a generated Llama test model on local
# files, quorum 1, API on 127.0.0.1:8080. Ctrl-C stops it and leaves nothing behind.
# Everything it writes lives under ./run/ (model, state, cache).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
RUN=${BUTTERFLY_DEMO_DIR:-$PWD/run}
mkdir -p "$RUN"
if [ ! -f "$RUN/model/config.json" ]; then
    .venv/bin/butterfly-admin make-test-model "$RUN/model" --layers 16 --hidden 512 --vocab 8192
fi
if [ ! -f "$RUN/model/butterfly-manifest.json" ]; then
    .venv/bin/butterfly-admin manifest build "$RUN/model"
fi
if [ ! -f "$RUN/cluster.key" ]; then
    .venv/bin/python -c 'import sys, pathlib; from butterfly.net.auth import generate_secret; generate_secret(pathlib.Path(sys.argv[1]))' "$RUN/cluster.key"
fi
cat > "$RUN/node.toml" <<TOML
[cluster]
cluster_name = "demo"
discovery_method = "static"
seed_nodes = []
quorum_size = 1

[model]
source_type = "filesystem"
source_path = "$RUN/model"

[node]
id = "demo-node"
role = "coordinator"
bind_address = "127.0.0.1:${BUTTERFLY_DEMO_PORT:-7000}"
state_dir = "$RUN/state"
cache_dir = "$RUN/cache"

[api]
listen = "127.0.0.1:${BUTTERFLY_DEMO_API_PORT:-8080}"

[security]
secret_file = "$RUN/cluster.key"
TOML
echo "node config: $RUN/node.toml — try: curl -s localhost:${BUTTERFLY_DEMO_API_PORT:-8080}/status"
exec .venv/bin/butterfly-node --config "$RUN/node.toml"
