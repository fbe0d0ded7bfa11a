#!/usr/bin/env bash
# Builds the lab's real peers from their Go modules at the versions pinned in the go.mod/go.sum
# files beside this script, into a cache directory that later runs reuse:
#   ARC (controller manager + its scale-set listener), kube-apiserver + kubectl, etcd, helm.
# Usage: tests/peers/build.sh [--print-dir]
#   ARCFED_PEERS_DIR  where the binaries go (default: ~/.cache/arcfed/peers)
#   GOCACHE/GOMODCACHE are Go's own; keep them between runs and a rebuild takes seconds.
# Nothing of these projects is vendored here: only the go.mod/go.sum naming them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${ARCFED_PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/arcfed/peers}
if [[ ${1:-} == --print-dir ]]; then echo "$out"; exit 0; fi
command -v go >/dev/null || { echo "tests/peers/build.sh: go is not installed (Go >= 1.26 is needed to build the lab's peers)" >&2; exit 3; }
export GOTOOLCHAIN=local CGO_ENABLED=0
# No VCS stamping: the modules here live in this repository's checkout, which says nothing about them.
export GOFLAGS="-buildvcs=false ${GOFLAGS:-}"
mkdir -p "$out"

# name module package [ldflags]
build() {
  local name=$1 module=$2 pkg=$3 ldflags=${4:-}
  local key
  key=$(cat "$here/$module/go.mod" "$here/$module/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)
  if [[ -x "$out/$name" && -f "$out/$name.key" && $(cat "$out/$name.key") == "$key" ]]; then
    echo "peer $name: cached ($out/$name)"; return
  fi
  local t0=$SECONDS
  echo "peer $name: building $pkg ..."
  (cd "$here/$module" && go build -trimpath -ldflags="-s -w $ldflags" -o "$out/$name.tmp" "$pkg")
  mv "$out/$name.tmp" "$out/$name"; echo "$key" > "$out/$name.key"
  echo "peer $name: built in $((SECONDS - t0)) s"
}

build etcd           etcd .
# Kubernetes stamps its version at link time (clients and charts check it).
kv=$(cd "$here/kube" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
kminor=${kv#v1.}; kminor=${kminor%%.*}
kflags="-X k8s.io/component-base/version.gitVersion=$kv -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$kminor -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$kv -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$kminor"
build kube-apiserver kube k8s.io/kubernetes/cmd/kube-apiserver "$kflags"
build kube-controller-manager kube k8s.io/kubernetes/cmd/kube-controller-manager "$kflags"
build kubectl        kube k8s.io/kubernetes/cmd/kubectl "$kflags"
# ARC's controller deletes an AutoscalingRunnerSet whose chart version label differs from its
# own build version: stamp the version of the charts in the same module, as ARC's release does.
arc_mod=$(cd "$here/arc" && go mod download -json github.com/actions/actions-runner-controller | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
arc_app=$(sed -n 's/^appVersion: "\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$arc_mod/charts/gha-runner-scale-set-controller/Chart.yaml")
aflags="-X github.com/actions/actions-runner-controller/build.Version=$arc_app"
build arc-manager    arc  github.com/actions/actions-runner-controller "$aflags"
build arc-listener   arc  github.com/actions/actions-runner-controller/cmd/githubrunnerscalesetlistener "$aflags"
build helm           helm helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$(cd "$here/helm" && go list -m -f '{{.Version}}' helm.sh/helm/v3)"
# Plain files of modules (not built): ARC's charts and CRDs at the pinned ARC version, and the
# CRDs of cert-manager and prometheus-operator that deploy/ uses, at the versions in sources.txt.
link() { # name module@version (checked against go.sum's hash by `go mod download`)
  local dir
  dir=$(cd "$here/arc" && go mod download -json "$2" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [[ -d $dir ]] || { echo "tests/peers/build.sh: could not download $2" >&2; exit 1; }
  ln -sfn "$dir" "$out/$1"
}
link arc-src "github.com/actions/actions-runner-controller@$(cd "$here/arc" && go list -m -f '{{.Version}}' github.com/actions/actions-runner-controller)"
while read -r name mv; do
  [[ -z $name || $name == \#* ]] || link "$name" "$mv"
done < "$here/sources.txt"
echo "peers ready in $out"
