#!/usr/bin/env bash
# The seed on one machine, for real (run as root): a router namespace with both zone gateways,
# two node namespaces (zone subnet-6 and subnet-7) whose uplink `ens192` is a veth into the router,
# one spiderpool-agent per node on one etcd, and one pod per node created by Debian's macvlan
# plugin with "ipam": {"type": "spiderpool"}. Shows the addresses, pings across the zones, shows
# `spiderctl get ippools`, then deletes the pods (CNI DEL) and tears everything down.
#
# Needs: etcd-server, containernetworking-plugins, iproute2, iputils-ping (./scripts/test-all.sh
# installs them), and a release build (done here).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces)" >&2; exit 1; }
for b in etcd ip ping /usr/lib/cni/macvlan; do
  command -v "$b" >/dev/null || [ -x "$b" ] || { echo "missing $b: apt-get install etcd-server iproute2 iputils-ping containernetworking-plugins" >&2; exit 1; }
done
cargo build -q --release -p spiderpool-cni -p spiderpool-agent
BIN=$PWD/target/release
W=$(mktemp -d /tmp/spiderpool-demo.XXXXXX)
T=demo$$
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for n in "$T-pod6" "$T-pod7" "$T-node6" "$T-node7" "$T-router"; do ip netns del "$n" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT

echo "== etcd on 127.0.0.1:23790"
etcd --name demo --data-dir "$W/etcd" --listen-client-urls http://127.0.0.1:23790 \
  --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
  --initial-advertise-peer-urls http://127.0.0.1:23800 --initial-cluster demo=http://127.0.0.1:23800 \
  >"$W/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/23790) 2>/dev/null && break; sleep 0.1; done

echo "== one agent per node (the seed's pools and nodes: testdata/seed-*.yaml)"
for node in controller-node-1 worker-node-1; do
  "$BIN/spiderpool-agent" --node-name "$node" --store "etcd:http://127.0.0.1:23790#/demo/" \
    --manifests testdata/seed-pools.yaml --manifests testdata/seed-cluster.yaml \
    --socket "$W/$node.sock" 2>"$W/$node.log" &
  pids+=($!)
done
for node in controller-node-1 worker-node-1; do
  for _ in $(seq 100); do [ -S "$W/$node.sock" ] && break; sleep 0.05; done
done

echo "== namespaces: router (10.6.0.1/16, 10.7.0.1/16), node6, node7"
for n in router node6 node7 pod6 pod7; do ip netns add "$T-$n"; ip -n "$T-$n" link set lo up; done
ip link add ens192 netns "$T-node6" type veth peer name r6 netns "$T-router"
ip link add ens192 netns "$T-node7" type veth peer name r7 netns "$T-router"
ip -n "$T-router" addr add 10.6.0.1/16 dev r6; ip -n "$T-router" addr add 10.7.0.1/16 dev r7
for l in r6 r7; do ip -n "$T-router" link set "$l" up; done
for n in node6 node7; do ip -n "$T-$n" link set ens192 up; done
ip netns exec "$T-router" sysctl -qw net.ipv4.ip_forward=1
mkdir -p "$W/cni"; ln -s "$BIN/spiderpool" "$W/cni/spiderpool"

add() { # zone node pod
  local conf='{"cniVersion":"1.0.0","name":"macvlan-zone","type":"macvlan","master":"ens192","mode":"bridge","ipam":{"type":"spiderpool","ipam_unix_socket_path":"'"$W/$2.sock"'"}}'
  echo "$conf" | ip netns exec "$T-node$1" env CNI_COMMAND="$4" CNI_CONTAINERID="sandbox-$3" \
    CNI_NETNS="/var/run/netns/$T-pod$1" CNI_IFNAME=eth0 CNI_PATH="$W/cni" \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$3;K8S_POD_UID=uid-$3" /usr/lib/cni/macvlan
}
echo "== CNI ADD through macvlan on each node"
add 6 controller-node-1 test-app-j9ftl ADD | tee "$W/add6.json"; echo
add 7 worker-node-1 test-app-nkq5h ADD | tee "$W/add7.json"; echo
ip6=$(ip -n "$T-pod6" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
ip7=$(ip -n "$T-pod7" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
echo "pod test-app-j9ftl on controller-node-1 (zone subnet-6): $ip6"
echo "pod test-app-nkq5h on worker-node-1   (zone subnet-7): $ip7"
echo "== ping across the zones, through the router"
ip netns exec "$T-pod6" ping -c 2 -W 2 "$ip7"
ip netns exec "$T-pod7" ping -c 2 -W 2 "$ip6"
echo "== spiderctl get ippools"
"$BIN/spiderctl" get ippools --socket "$W/worker-node-1.sock"
"$BIN/spiderctl" get endpoints --socket "$W/worker-node-1.sock"
echo "== CNI DEL"
add 6 controller-node-1 test-app-j9ftl DEL
add 7 worker-node-1 test-app-nkq5h DEL
"$BIN/spiderctl" get ippools --socket "$W/worker-node-1.sock"
echo "== done (tearing down)"
