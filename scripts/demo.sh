#!/usr/bin/env bash
# Starts a local Butterfly cluster on the embedded default: a generated Llama test model on local
# files, N nodes (default 3, `scripts/demo.sh 1` for a single node) on 127.0.0.1..N, their APIs on
# 127.0.0.1:8080, 8081, ... Ctrl-C stops every node and leaves nothing behind.
# Everything it writes lives under ./run/ (model, manifest, key, per-node state and cache).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3}
scripts/bootstrap.sh
RUN=${BUTTERFLY_DEMO_DIR:-$PWD/run}
API=${BUTTERFLY_DEMO_API_PORT:-8080}
PORT=${BUTTERFLY_DEMO_PORT:-7000}
mkdir -p "$RUN"
if [ ! -f "$RUN/model/config.json" ]; then
    .venv/bin/butterfly-admin make-test-model "$RUN/model" --layers 16 --hidden 512 --vocab 8192
fi
if [ ! -f "$RUN/model/butterfly-manifest.json" ]; then
    .venv/bin/butterfly-admin manifest build "$RUN/model"
fi
if [ ! -f "$RUN/cluster.key" ]; then
    .venv/bin/butterfly-admin secret create "$RUN/cluster.key"
fi

pids=()
stop() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait; }
trap stop INT TERM EXIT
for i in $(seq 1 "$N"); do
    seeds=""
    for j in $(seq 1 "$N"); do
        [ "$j" = "$i" ] || seeds="$seeds\"127.0.0.$j:$PORT\", "
    done
    dir="$RUN/cluster$N/node$i"   # Raft state belongs to one cluster shape
    mkdir -p "$dir"
    cat > "$dir/node.toml" <<TOML
[cluster]
cluster_name = "demo"
discovery_method = "static"
seed_nodes = [${seeds%, }]
quorum_size = $N

[model]
source_type = "filesystem"
source_path = "$RUN/model"

[node]
id = "demo-node$i"
role = "coordinator"
bind_address = "127.0.0.$i:$PORT"
state_dir = "$dir/state"
cache_dir = "$dir/cache"

[api]
listen = "127.0.0.1:$((API + i - 1))"

[security]
secret_file = "$RUN/cluster.key"
TOML
    .venv/bin/butterfly-node --config "$dir/node.toml" 2>&1 | sed -u "s/^/[node$i] /" &
    pids+=($!)
done
echo "$N node(s) starting — try: curl -s localhost:$API/status   (nodes: ports $API..$((API + N - 1)))"
wait
