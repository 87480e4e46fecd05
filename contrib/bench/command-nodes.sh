#!/usr/bin/env bash
# Command throughput with N = 1, 2, 3 command nodes (`[node] ownership =
# "group"`) and one query node that `cqrsd bench commands --url` sends to, so
# every command takes one forward to its partition's owner whatever N is;
# then the baseline: one node of role "all" on the same broker (no group, no
# transactions, no forward). Each run on a fresh in-memory Tansu broker on
# 127.0.0.1:19092; nodes on 127.0.0.1:18081-18083 and 18090. Every wait and
# run is bounded. BENCHMARKS.md ("Several command nodes") has the results.
#
#   B=target/release/cqrsd T=<tansu binary> contrib/bench/command-nodes.sh
#
# The tests provision Tansu under <target dir>/tansu (tests/it/harness.rs).
set -u
B=${B:?the cqrsd binary}
T=${T:?the tansu binary}
W=$(mktemp -d); cd "$W" || exit 1
PIDS="" TP=""
broker() {
  $T broker --listener-url tcp://127.0.0.1:19092 --advertised-listener-url tcp://127.0.0.1:19092 --storage-engine memory://tansu/ >/dev/null 2>&1 &
  TP=$!
  for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/19092) 2>/dev/null && break; sleep 0.2; done
}
node() {  # name role port ownership peers...
  name=$1 role=$2 port=$3 own=$4; shift 4
  peers=$(printf '"http://127.0.0.1:%s",' "$@")
  cat > $name.toml <<TOML
[http]
listen = "127.0.0.1:$port"
[storage]
data_dir = "./data-$name"
[logging]
level = "warn"
[log]
backend = "kafka"
[log.kafka]
brokers = "127.0.0.1:19092"
topic_prefix = "own$N"
[node]
role = "$role"
advertise_url = "http://127.0.0.1:$port"
peers = [${peers%,}]
ownership = "$own"
session_timeout_ms = 3000
TOML
  if [ "$role" = all ]; then sed -i '/^peers\|^ownership\|^advertise_url\|^session_timeout/d' $name.toml; fi
  $B serve --config $name.toml > $name.log 2>&1 &
  PIDS="$PIDS $!"
}
stop() { kill -TERM $PIDS 2>/dev/null; wait $PIDS 2>/dev/null; kill -9 $TP 2>/dev/null; wait $TP 2>/dev/null; PIDS=""; rm -rf "$W"/data-*; }
for N in 1 2 3; do
  broker
  ports=$(seq 18081 $((18080 + N)))
  for p in $ports; do node c$p command $p group $(echo $ports | tr ' ' '\n' | grep -v "^$p$") 18090; done
  node q query 18090 group $ports
  owned() { for p in $ports; do curl -s localhost:$p/admin/node | jq -r '.ownership.owned[]?'; done; }
  for i in $(seq 1 120); do [ "$(owned | sort -u | wc -l)" = 8 ] && break; sleep 1; done
  for _ in $(seq 1 120); do curl -sf localhost:18090/readyz >/dev/null && break; sleep 0.5; done
  echo "=== N=$N command nodes, owned: $(owned | sort -u | wc -l) partitions, load $(cut -d' ' -f1 /proc/loadavg)"
  timeout 120 $B bench commands --url http://127.0.0.1:18090 --duration 10 --clients 32 --aggregates 2000 --json
  stop
done
N=0
broker
node a all 18081 none
for _ in $(seq 1 120); do curl -sf localhost:18081/readyz >/dev/null && break; sleep 0.5; done
echo "=== baseline: one node, role all, load $(cut -d' ' -f1 /proc/loadavg)"
timeout 120 $B bench commands --url http://127.0.0.1:18081 --duration 10 --clients 32 --aggregates 2000 --json
stop
echo "=== done"
rm -rf "$W"
