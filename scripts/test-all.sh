#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need (as root, through
# apt-get, only when missing), then checks formatting and lints, runs every test of every crate
# with every feature, and replays the seed scenario. `.ci/run` calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v protoc >/dev/null 2>&1 || need_pkgs+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || need_pkgs+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_pkgs+=(etcd-client)
[ -x /usr/lib/cni/macvlan ] || need_pkgs+=(containernetworking-plugins)
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v ping >/dev/null 2>&1 || need_pkgs+=(iputils-ping)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
# The CNI chain tests: a kube-proxy stand-in (iptables) and a real runtime (podman + runc,
# busybox for its image).
command -v iptables >/dev/null 2>&1 || need_pkgs+=(iptables)
command -v podman >/dev/null 2>&1 || need_pkgs+=(podman)
command -v runc >/dev/null 2>&1 || need_pkgs+=(runc)
[ -x /usr/bin/busybox ] || need_pkgs+=(busybox-static)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "!! missing ${need_pkgs[*]} and not root: tests that need them will SKIP (loudly)" >&2
  fi
fi

# The Kubernetes tests need a real kube-apiserver: envtest's convention is KUBEBUILDER_ASSETS, a
# directory holding kube-apiserver (this lab keeps one at ../shared/envtest), and kubectl.
# Elsewhere, as controller-runtime users do: setup-envtest (on PATH, or through Go and a network).
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && [ -x ../shared/envtest/kube-apiserver ]; then
  KUBEBUILDER_ASSETS="$(cd ../shared/envtest && pwd)"
fi
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && command -v setup-envtest >/dev/null 2>&1; then
  KUBEBUILDER_ASSETS="$(setup-envtest use -p path 1.24.x 2>/dev/null || true)"
fi
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && command -v go >/dev/null 2>&1; then
  KUBEBUILDER_ASSETS="$(go run sigs.k8s.io/controller-runtime/tools/setup-envtest@release-0.19 use -p path 1.24.x 2>/dev/null || true)"
fi
if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  export KUBEBUILDER_ASSETS
  echo "== kube-apiserver for the Kubernetes tests: $KUBEBUILDER_ASSETS"
else
  cat >&2 <<'MSG'
!! no kube-apiserver for the Kubernetes tests (they will SKIP loudly; in CI they fail). Get one:
!!   go install sigs.k8s.io/controller-runtime/tools/setup-envtest@release-0.19
!!   export KUBEBUILDER_ASSETS="$(setup-envtest use -p path 1.24.x)"
!! (or point KUBEBUILDER_ASSETS at any directory holding a kube-apiserver binary; etcd comes
!! from Debian's etcd-server, which this script installs)
MSG
fi
command -v kubectl >/dev/null 2>&1 || echo "!! kubectl missing: Kubernetes tests will fail (install kubectl)" >&2

export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== structure (no file over 800 lines, no function over 100, no import cycle)"
python3 scripts/check-structure.py
echo "== cargo clippy (all targets, all features)"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== cargo test (all crates, all features)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-features 2>&1 | tee "$log"
# A test that skips (component missing outside CI) returns early, so the harness counts it as
# passed; it prints exactly one 'SKIPPED:' line, and is counted here as skipped instead.
harness_passed=$(awk '/^test result:/ {p += $4} END {print p + 0}' "$log")
failed=$(awk '/^test result:/ {f += $6} END {print f + 0}' "$log")
skipped=$(grep -c 'SKIPPED:' "$log" || true)
passed=$((harness_passed - skipped))
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps -q
echo "== the seed scenario: cargo run --example cross_zone"
cargo run -q --example cross_zone >/dev/null
echo "== fuzz smoke run (10 s per target; longer: scripts/fuzz.sh 600)"
./scripts/fuzz.sh 10
echo "== all checks passed"
echo "tests: $passed passed, $failed failed, $skipped skipped"
