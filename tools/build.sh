#!/usr/bin/env bash
# Build the real control plane (etcd, kube-apiserver, kubectl, kube-controller-manager,
# kube-scheduler, kwok) from the pinned Go modules under tools/ into a cache outside the
# work tree, and print that directory as the LAST line of stdout. Progress goes to stderr,
# so `dir=$(bash tools/build.sh)` works.
#
# - KUBEBUILDER_ASSETS naming a directory with etcd and kube-apiserver (what
#   `setup-envtest use -p path` prints) is used as is: nothing is built.
# - The cache directory is named after the pinned versions read from the go.mod files:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/mailtls/controlplane/<k8s>-etcd<ver>-kwok<ver>/.
#   A stamp file, written only once every binary has been built, makes later runs a
#   no-op that needs no Go at all.
# - Without a Go new enough for the modules: one loud line naming what to install, exit 1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  if [[ -x "$KUBEBUILDER_ASSETS/etcd" && -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]]; then
    echo "controlplane: using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS (nothing built)" >&2
    echo "$KUBEBUILDER_ASSETS"
    exit 0
  fi
  echo "controlplane: KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no etcd and kube-apiserver;" \
       "building from tools/ instead" >&2
fi

# The version a go.mod requires of a module (one-line `require` or inside a block).
required() {
  awk -v m="$2" '$1 == "require" && $2 == m { print $3; exit }
                 $1 == m && $2 ~ /^v/ { print $2; exit }' "$here/$1/go.mod"
}
k8s=$(required kubernetes k8s.io/kubernetes)
etcd=$(required etcd go.etcd.io/etcd/server/v3)
kwok=$(required kwok sigs.k8s.io/kwok)
if [[ -z "$k8s" || -z "$etcd" || -z "$kwok" ]]; then
  echo "controlplane: cannot read the pinned versions from tools/*/go.mod" >&2
  exit 1
fi

out="${XDG_CACHE_HOME:-$HOME/.cache}/mailtls/controlplane/${k8s}-etcd${etcd#v}-kwok${kwok#v}"
stamp="$out/.complete"
# kwok is built from its module's source with tools/kwok/patches/*.patch applied (see the
# README there); the patches are part of its key, so changing them rebuilds kwok alone.
kwok_key=$( (echo "$kwok"; cat "$here"/kwok/patches/*.patch 2>/dev/null) | sha256sum | cut -c1-16)
kwok_stamp="$out/.kwok-$kwok_key"
if [[ -f "$stamp" && -f "$kwok_stamp" ]]; then
  echo "$out"
  exit 0
fi

# The newest `go` directive among the modules is the Go this needs (no toolchain
# downloads: GOTOOLCHAIN=local).
need=$(awk '$1 == "go" { print $2 }' "$here"/{kubernetes,etcd,kwok}/go.mod | sort -V | tail -1)
go=""
for candidate in "${GO:-}" "$(command -v go || true)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
  [[ -n "$candidate" && -x "$candidate" ]] || continue
  have=$(GOTOOLCHAIN=local "$candidate" env GOVERSION 2>/dev/null | sed 's/^go//')
  if [[ -n "$have" && "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" == "$need" ]]; then
    go=$candidate
    break
  fi
done
if [[ -z "$go" ]]; then
  echo "!!! controlplane: Go >= $need is needed to build etcd and kube-apiserver:" \
       "install it from https://go.dev/dl/ to /usr/local/go (or set GO=/path/to/go)," \
       "or point KUBEBUILDER_ASSETS at setup-envtest's binaries !!!" >&2
  exit 1
fi

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
mkdir -p "$out"
log="$out/build.log"
: > "$log"
if [[ -f "$stamp" ]]; then
  echo "controlplane: rebuilding kwok $kwok with its patches into $out (log: $log)" >&2
else
  echo "controlplane: building Kubernetes $k8s, etcd $etcd, kwok $kwok with $go into $out" \
       "(cold: 30-50 min on 2 busy cores; log: $log)" >&2
fi

major=${k8s#v}; major=${major%%.*}
minor=${k8s#v*.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

start=$SECONDS
# build LANE MODULE_DIR TAGS LDFLAGS NAME=PACKAGE...: one `go build` for all packages of a
# module (they share compiled dependencies), then one progress line per binary.
build() {
  local dir=$1 tags=$2 flags=$3; shift 3
  local names=() pkgs=() spec
  for spec in "$@"; do names+=("${spec%%=*}"); pkgs+=("${spec#*=}"); done
  # -o DIR/ names each binary after its package's last element; a lone package (etcd's
  # is go.etcd.io/etcd/server/v3) gets its name explicitly.
  local target="$out/.tmp-$dir/"
  [[ ${#pkgs[@]} -eq 1 ]] && target+="${names[0]}"
  if (cd "$here/$dir" && "$go" build ${MODFILE:+-modfile="$MODFILE"} -trimpath \
        -tags "$tags" -ldflags "$flags" -o "$target" "${pkgs[@]}") >>"$log" 2>&1; then
    local i
    for i in "${!names[@]}"; do
      local built="$out/.tmp-$dir/${names[$i]}"
      [[ ${#pkgs[@]} -eq 1 ]] || built="$out/.tmp-$dir/$(basename "${pkgs[$i]}")"
      mv "$built" "$out/${names[$i]}"
      echo "controlplane: built ${names[$i]} ($((SECONDS - start)) s)" >&2
    done
    rmdir "$out/.tmp-$dir"
  else
    echo "controlplane: building ${names[*]} FAILED ($((SECONDS - start)) s); see $log" >&2
    return 1
  fi
}

# kwok's module source, copied next to the binaries and patched (kwok.py reads its stage
# and CRD files there too), built through a go.mod copy that replaces the module with it.
build_kwok() {
  local src="$out/kwok-src" mod p
  mod=$(cd "$here/kwok" && "$go" mod download -json sigs.k8s.io/kwok \
        | awk -F'"' '$2 == "Dir" { print $4 }')
  [[ -n "$mod" ]] || { echo "controlplane: cannot download sigs.k8s.io/kwok" >&2; return 1; }
  rm -rf "$src" "$out/.modfile-kwok" "$out"/.kwok-*
  cp -r "$mod" "$src" && chmod -R u+w "$src"
  for p in "$here"/kwok/patches/*.patch; do
    [[ -f "$p" ]] || continue
    patch -d "$src" -p1 --quiet --forward < "$p" >>"$log" 2>&1 \
      || { echo "controlplane: kwok patch $(basename "$p") FAILED; see $log" >&2; return 1; }
  done
  mkdir -p "$out/.modfile-kwok"
  cp "$here/kwok/go.mod" "$here/kwok/go.sum" "$out/.modfile-kwok/"
  echo "replace sigs.k8s.io/kwok => $src" >> "$out/.modfile-kwok/go.mod"
  MODFILE="$out/.modfile-kwok/go.mod" build kwok "" "-s -w" kwok=sigs.k8s.io/kwok/cmd/kwok \
    && touch "$kwok_stamp"
}

if [[ -f "$stamp" ]]; then
  # Everything else is current: only kwok's patches changed.
  build_kwok || { tail -20 "$log" >&2; exit 1; }
  echo "$out"
  exit 0
fi

# Two lanes for two cores: the four Kubernetes commands (the long one) beside etcd then
# kwok; go build parallelises inside each, and the lanes overlap each other's link steps.
build kubernetes selinux,notest,grpcnotrace "$ldflags" \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver kubectl=k8s.io/kubernetes/cmd/kubectl \
  kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
  kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler &
lane_k8s=$!
{ build etcd "" "-s -w" etcd=go.etcd.io/etcd/server/v3 &&
  build_kwok; } &
lane_other=$!
trap 'kill "$lane_k8s" "$lane_other" 2>/dev/null; exit 130' INT TERM
# A heartbeat in the foreground (no background sleep left holding a caller's pipe open).
next=60
while kill -0 "$lane_k8s" 2>/dev/null || kill -0 "$lane_other" 2>/dev/null; do
  sleep 2
  if (( SECONDS - start >= next )); then
    echo "controlplane: still building ($((SECONDS - start)) s)" >&2
    next=$((next + 60))
  fi
done
status=0
wait "$lane_k8s" || status=1
wait "$lane_other" || status=1
if [[ $status -ne 0 ]]; then
  tail -20 "$log" >&2
  exit 1
fi
date -u +%FT%TZ > "$stamp"
echo "controlplane: done in $((SECONDS - start)) s" >&2
echo "$out"
