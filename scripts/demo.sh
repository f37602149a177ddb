#!/usr/bin/env bash
# Starts a local Butterfly cluster on the embedded default: a generated Llama test model on local
# files, N nodes (default 3, `scripts/demo.sh 1` for a single node) on 127.0.0.1..N, their APIs on
# 127.0.0.1:8080, 8081, ... It waits until the cluster is OPERATIONAL, prints a completion the
# cluster serves, and says where to look.
# Ctrl-C, SIGTERM or closing the terminal stops every node it started (and so does killing the
# script outright: a watcher stops them), leaving nothing running.
# Everything it writes lives under ./run/ (model, manifest, key, per-node state and cache).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3}
T0=$SECONDS
say() { echo "[demo] $*"; }
say "setting up .venv (the first run installs the dependencies: a few minutes)"
scripts/bootstrap.sh
RUN=${BUTTERFLY_DEMO_DIR:-$PWD/run}
API=${BUTTERFLY_DEMO_API_PORT:-8080}
PORT=${BUTTERFLY_DEMO_PORT:-7000}
mkdir -p "$RUN"
if [ ! -f "$RUN/model/config.json" ]; then
    say "generating a 16-layer Llama test model with its tokenizer and manifest in $RUN/model"
    .venv/bin/butterfly-admin make-test-model "$RUN/model" --layers 16 --hidden 512 --vocab 8192
fi
if [ ! -f "$RUN/model/butterfly-manifest.json" ]; then
    .venv/bin/butterfly-admin manifest build "$RUN/model"
fi
if [ ! -f "$RUN/cluster.key" ]; then
    .venv/bin/butterfly-admin secret create "$RUN/cluster.key"
fi

# Each node runs in its own process group (job control): Ctrl-C and a closing terminal reach only
# this script, which stops the nodes in order (SIGTERM, then SIGKILL after 30 s).
set -m
pids=()
watcher=
poller=
stop() {
    local status=${1:-0}
    set +e
    trap - INT TERM HUP EXIT
    [ -n "$watcher" ] && kill "$watcher" 2>/dev/null
    [ -n "$poller" ] && kill -- -"$poller" 2>/dev/null   # its own process group (set -m): children too
    if [ ${#pids[@]} -gt 0 ]; then
        say "stopping ${#pids[@]} node(s)"
        kill -TERM "${pids[@]}" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        for p in "${pids[@]}"; do
            while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
            kill -KILL "$p" 2>/dev/null && say "node pid $p did not stop in 30 s: killed"
        done
        say "all nodes stopped"
    fi
    exit "$status"
}
trap 'stop 130' INT
trap 'stop 143' TERM
trap 'stop 129' HUP
trap 'stop $?' EXIT
say "starting $N node(s)"
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
    .venv/bin/butterfly-node --config "$dir/node.toml" > >(trap '' INT HUP; exec sed -u "s/^/[node$i] /") 2>&1 &
    pids+=($!)
done
# Killed outright (SIGKILL), the script runs no trap: this watcher then stops the nodes.
(
    trap '' INT HUP
    # Until this script is gone: then the watcher is re-parented (a zombie parent still answers kill -0).
    while read -r _ _ _ ppid _ </proc/$BASHPID/stat && [ "$ppid" = $$ ]; do sleep 1; done
    kill -TERM "${pids[@]}" 2>/dev/null
) &
watcher=$!
disown "$watcher"   # no job notice when it is stopped

urls=()
for i in $(seq 1 "$N"); do urls+=("http://127.0.0.1:$((API + i - 1))"); done
# Prints each change of the nodes' states and progress until every node is OPERATIONAL; fails if a
# node process exits first.
poller_script=$(cat <<'PY'
import json, os, sys, time, urllib.request
pids = [int(a[4:]) for a in sys.argv[1:] if a.startswith("pid=")]
urls = [a for a in sys.argv[1:] if not a.startswith("pid=")]
last = None
while True:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(f"[demo] node pid {pid} exited before the cluster became OPERATIONAL; see its lines above")
    states = []
    for url in urls:
        try:
            with urllib.request.urlopen(url + "/status", timeout=2) as r:
                st = json.load(r)
            pct = st.get("progress_percent")
            states.append(f"{st.get('state')}" + (f" {pct:.0f}%" if st.get("state") == "LOADING" and pct is not None else ""))
        except (OSError, ValueError):
            states.append("starting")
    line = ", ".join(f"node{i + 1} {s}" for i, s in enumerate(states))
    if line != last:
        print(f"[demo] {line}", flush=True)
        last = line
    if all(s == "OPERATIONAL" for s in states):
        break
    time.sleep(0.5)
PY
)
# In the background (its own process group), so Ctrl-C reaches this script, not the poller.
.venv/bin/python -c "$poller_script" "${pids[@]/#/pid=}" "${urls[@]}" &
poller=$!
wait "$poller"
poller=
say "cluster OPERATIONAL, $((SECONDS - T0)) s after the demo started"
# A completion served by the cluster: through node1's API (any node forwards to the pipeline's
# entry). Just OPERATIONAL, the stages' ring may still be linking up (503): asked again meanwhile.
# In the background like the poller, so that a signal stops the demo at once.
prompt="The cluster says"
say "asking node1 for a completion: butterfly-admin generate --url ${urls[0]} --max-tokens 24 --temperature 0 \"$prompt\""
(
    for _ in $(seq 1 60); do
        if out=$(.venv/bin/butterfly-admin generate --url "${urls[0]}" --max-tokens 24 --temperature 0 "$prompt" 2>&1); then
            printf '%s\n' "$out" | sed 's/^/[demo] completion: /'
            exit 0
        fi
        sleep 0.5
    done
    printf '%s\n' "$out" | sed 's/^/[demo] no completion: /'
    exit 1
) &
poller=$!
wait "$poller" || true
poller=
say "(the test model's weights are random, so are its words; every token was computed by the ${N} node(s)' layers in turn)"
say "where to look next:"
say "  .venv/bin/butterfly-admin status                     each node's state, role, term and layers (add --url ${urls[0]})"
say "  .venv/bin/butterfly-admin watch --url ${urls[0]}   live phase and progress"
say "  curl -s ${urls[0]}/status                  the raw status (nodes on ports $API..$((API + N - 1)))"
say "  logs: the [nodeN] lines here; state and cache under $RUN/cluster$N/"
say "Ctrl-C stops every node."
wait -n "${pids[@]}" || true
say "a node exited on its own; stopping the others"
stop 1
