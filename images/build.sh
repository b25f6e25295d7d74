#!/usr/bin/env bash
# Build the two images with podman (or docker where a daemon answers):
#   bash images/build.sh images   localhost/mailtls-operator:dev, localhost/mailtls-postfix:dev
#   bash images/build.sh bases    only resolve (or make) the two base images
#   bash images/build.sh engine   print the engine that would be used, or why there is none
#   bash images/build.sh standins (re)build both local stand-in bases now (fresh packages)
#
# The Dockerfiles name the official bases (python:3.11.x-slim-bookworm,
# debian:bookworm-slim) and take them as build arguments (PYTHON_IMAGE, DEBIAN_IMAGE).
# This script uses the official base when it is present locally or can be pulled. Where
# no registry is reachable it builds a local stand-in once and reuses it afterwards:
#   localhost/mailtls-standin-debian:bookworm-slim   mmdebstrap --variant=minbase bookworm,
#       without documentation, man pages and locales, as the official slim image;
#   localhost/mailtls-standin-python:3.11-slim-bookworm   the same plus Debian's
#       python3.11, whose pip behaves like the official image's: pip, setuptools and
#       wheel installed by pip itself under /usr/local (so `pip uninstall pip` works),
#       no EXTERNALLY-MANAGED marker, `python`/`python3`/`pip` on the PATH.
# The stand-ins are not the official images (the interpreter is Debian's 3.11.2 build in
# /usr/bin, packages land in /usr/local/lib/python3.11/dist-packages); docs/install.md
# says what was verified with them.
#
# Environment: CONTAINER_ENGINE (podman|docker), OPERATOR_TAG, POSTFIX_TAG,
# PYTHON_IMAGE, DEBIAN_IMAGE (force a base), PULL_TIMEOUT (seconds, default 20),
# NO_PULL=1 (never try the registry),
# NO_CACHE=1 (build without the layer cache), IMAGES_TIMINGS (a file to append
# "name seconds" lines to, for make bench).
set -euo pipefail
cd "$(dirname "$0")/.."

OPERATOR_TAG=${OPERATOR_TAG:-localhost/mailtls-operator:dev}
POSTFIX_TAG=${POSTFIX_TAG:-localhost/mailtls-postfix:dev}
OFFICIAL_PYTHON=$(sed -n 's/^ARG PYTHON_IMAGE=//p' operator/Dockerfile)
OFFICIAL_DEBIAN=$(sed -n 's/^ARG DEBIAN_IMAGE=//p' images/postfix/Dockerfile)
STANDIN_DEBIAN=localhost/mailtls-standin-debian:bookworm-slim
STANDIN_PYTHON=localhost/mailtls-standin-python:3.11-slim-bookworm
# Bump when the stand-in recipe below changes: older stand-ins are then rebuilt.
STANDIN_RECIPE=5
PULL_TIMEOUT=${PULL_TIMEOUT:-20}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/images/containers.conf}

die() { echo "images: $*" >&2; exit 1; }
say() { echo "images: $*" >&2; }

# The engine, or a reason on stdout with exit 1.
find_engine() {
    local want=${CONTAINER_ENGINE:-}
    if [ -z "$want" ] || [ "$want" = podman ]; then
        if command -v podman >/dev/null 2>&1; then
            if timeout 60 podman info >/dev/null 2>&1; then echo podman; return 0; fi
            [ "$want" = podman ] && { echo "podman info failed"; return 1; }
        elif [ "$want" = podman ]; then
            echo "podman is not installed"; return 1
        fi
    fi
    if command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; then
        echo docker; return 0
    fi
    echo "neither podman (apt-get install podman runc) nor a docker daemon is available"
    return 1
}

exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

recipe_of() { "$ENGINE" image inspect --format '{{ index .Config.Labels "io.mailtls.standin-recipe" }}' "$1" 2>/dev/null || true; }

# rootfs tarball on stdout: bookworm minbase, slimmed like the official slim images.
rootfs() {
    command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap is needed to build a stand-in base (apt-get install mmdebstrap)"
    local tmp; tmp=$(mktemp -d)
    # What the official image keeps in /etc, so that packages installed on top stay
    # slim too: dpkg leaves out documentation, man pages and locales; apt keeps no
    # package cache and no downloaded .debs, and fetches no translations.
    printf '%s\n' 'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/doc/*' \
        'path-include=/usr/share/doc/*/copyright' 'path-exclude=/usr/share/locale/*' \
        'path-exclude=/usr/share/info/*' > "$tmp/dpkg-slim"
    local clean='"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true";'
    printf '%s\n' "DPkg::Post-Invoke { $clean };" "APT::Update::Post-Invoke { $clean };" \
        'Dir::Cache::pkgcache "";' 'Dir::Cache::srcpkgcache "";' 'Acquire::Languages "none";' \
        > "$tmp/apt-clean"
    # No mirror argument and stdin closed: mmdebstrap uses its Debian default sources
    # (bookworm, bookworm-updates, bookworm-security). The merged-usr hook instead of
    # the usrmerge package (which pulls in perl), as the official image is built. The
    # chatter goes to a log, shown on failure.
    local status=0
    mmdebstrap --quiet --variant=minbase --mode=root \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt="$tmp/dpkg-slim" \
        --setup-hook='mkdir -p "$1/etc/dpkg/dpkg.cfg.d" "$1/etc/apt/apt.conf.d"' \
        --setup-hook="upload $tmp/dpkg-slim /etc/dpkg/dpkg.cfg.d/docker" \
        --customize-hook="upload $tmp/apt-clean /etc/apt/apt.conf.d/docker-clean" \
        --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/cache/apt/*.bin' \
        "$@" bookworm - </dev/null 2>"$tmp/log" || status=$?
    [ "$status" = 0 ] || cat "$tmp/log" >&2
    rm -rf "$tmp"
    return "$status"
}

import_rootfs() { # TAG CHANGE...
    local tag=$1; shift
    local args=(--change "LABEL io.mailtls.standin-recipe=$STANDIN_RECIPE")
    for c in "$@"; do args+=(--change "$c"); done
    local old; old=$("$ENGINE" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
    "$ENGINE" import "${args[@]}" - "$tag" >/dev/null
    # The stand-in it replaces, now untagged (kept if an image still builds on it).
    [ -z "$old" ] || "$ENGINE" rmi "$old" >/dev/null 2>&1 || true
}

build_standin_debian() {
    say "building $STANDIN_DEBIAN (bookworm minbase)"
    rootfs | import_rootfs "$STANDIN_DEBIAN" 'CMD ["bash"]'
}

build_standin_python() {
    say "building $STANDIN_PYTHON (bookworm minbase + python3.11, pip as in the official image)"
    # The hook runs in the finished root filesystem ($1): pip installs pip, setuptools
    # and wheel from Debian's wheel packages into /usr/local, where the official image
    # has them, and the externally-managed marker (PEP 668) goes away, as upstream.
    local hook='set -e
        rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED
        chroot "$1" python3.11 -c "import glob, runpy, sys; sys.path.insert(0, glob.glob(\"/usr/share/python-wheels/pip-*.whl\")[0]); sys.argv = [\"pip\", \"install\", \"--no-index\", \"--find-links=/usr/share/python-wheels\", \"--no-warn-script-location\", \"--no-compile\", \"pip\", \"setuptools\", \"wheel\"]; runpy.run_module(\"pip\", run_name=\"__main__\")"
        ln -sf /usr/bin/python3.11 "$1"/usr/local/bin/python3
        ln -sf /usr/bin/python3.11 "$1"/usr/local/bin/python
        chroot "$1" apt-get purge -y -q python3-pip-whl python3-setuptools-whl python3-wheel-whl >/dev/null
        # The official image keeps no bytecode either (its Dockerfile deletes *.pyc).
        find "$1"/usr/lib/python3* "$1"/usr/local/lib -depth -name __pycache__ -type d -exec rm -rf {} +
        rm -rf "$1"/var/lib/apt/lists/* "$1"/root/.cache'
    rootfs --include=ca-certificates,netbase,tzdata,python3.11,python3-pip-whl,python3-setuptools-whl,python3-wheel-whl \
        --customize-hook="$hook" \
        | import_rootfs "$STANDIN_PYTHON" 'ENV LANG=C.UTF-8' \
            'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            'CMD ["python3"]'
}

# The base to use for OFFICIAL: given, present, pulled, or the stand-in (built if needed).
resolve() { # OFFICIAL STANDIN BUILDER
    local official=$1 standin=$2 builder=$3
    if exists "$official"; then echo "$official"; return; fi
    if exists "$standin" && [ "$(recipe_of "$standin")" = "$STANDIN_RECIPE" ]; then
        echo "$standin"; return
    fi
    # Fully qualified, as podman resolves no short names without a terminal to ask.
    local ref=$official first=${official%%/*}
    case $official in
        */*) case $first in *.*|*:*|localhost) ;; *) ref=docker.io/$official ;; esac ;;
        *) ref=docker.io/library/$official ;;
    esac
    if exists "$ref"; then echo "$ref"; return; fi
    if [ "${NO_PULL:-0}" != 1 ] && timeout "$PULL_TIMEOUT" "$ENGINE" pull -q "$ref" >/dev/null 2>&1; then
        echo "$ref"; return
    fi
    say "$official cannot be pulled here: using the local stand-in $standin"
    "$builder"
    echo "$standin"
}

timed() { # NAME COMMAND...
    local name=$1; shift
    local start; start=$(date +%s.%N)
    "$@"
    [ -z "${IMAGES_TIMINGS:-}" ] || \
        echo "$name $(date +%s.%N) $start" | awk '{printf "%s %.2f\n", $1, $2 - $3}' >> "$IMAGES_TIMINGS"
}

bases() {
    PYTHON_BASE=${PYTHON_IMAGE:-$(resolve "$OFFICIAL_PYTHON" "$STANDIN_PYTHON" build_standin_python)}
    DEBIAN_BASE=${DEBIAN_IMAGE:-$(resolve "$OFFICIAL_DEBIAN" "$STANDIN_DEBIAN" build_standin_debian)}
    say "bases: PYTHON_IMAGE=$PYTHON_BASE DEBIAN_IMAGE=$DEBIAN_BASE"
}

build() { # TAG DOCKERFILE CONTEXT BUILD-ARG [operator]
    local opts=()
    [ "$ENGINE" = podman ] && opts=(--pull=never)
    [ "${NO_CACHE:-0}" = 1 ] && opts+=(--no-cache)
    if [ "$ENGINE" = podman ] && [ "${5:-}" = operator ]; then
        # podman 4.3 (buildah 1.28) keys a RUN step's cache without the content of its
        # `--mount=type=bind,from=build`: after a source change the runtime stage came
        # from the cache with the OLD packages installed (and a cached build stage
        # cannot be mounted at all: "couldn't find .../merged/wheels"). So the operator
        # image is built without the layer cache, and without keeping intermediate
        # images, on podman. (BuildKit keys the mount by content.)
        opts+=(--no-cache --layers=false)
        # This machine reaches PyPI through a TLS-intercepting proxy whose CA is in the
        # host's trust store: lend that file to the RUN steps (a bind mount, never a
        # layer), as Debian's pip in the stand-in reads the system store. BUILD_CA_BUNDLE=
        # (empty) turns it off.
        local ca=${BUILD_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
        [ -n "$ca" ] && [ -f "$ca" ] && opts+=(--volume "$ca:/etc/ssl/certs/ca-certificates.crt:ro")
    fi
    say "building $1"
    local old; old=$("$ENGINE" image inspect --format '{{.Id}}' "$1" 2>/dev/null || true)
    "$ENGINE" build "${opts[@]}" --network host -q -f "$2" --build-arg "$4" -t "$1" "$3" >/dev/null
    # The image this tag named before, now untagged (kept if something still uses it).
    local new; new=$("$ENGINE" image inspect --format '{{.Id}}' "$1")
    [ -z "$old" ] || [ "$old" = "$new" ] || "$ENGINE" rmi "$old" >/dev/null 2>&1 || true
}

[ -n "${OFFICIAL_PYTHON}" ] && [ -n "${OFFICIAL_DEBIAN}" ] || die "no ARG PYTHON_IMAGE / DEBIAN_IMAGE default in the Dockerfiles"
case ${1:-images} in
    engine)
        find_engine ;;
    bases)
        ENGINE=$(find_engine) || die "$ENGINE"
        bases ;;
    standins)
        ENGINE=$(find_engine) || die "$ENGINE"
        timed standin-debian build_standin_debian
        timed standin-python build_standin_python ;;
    images)
        ENGINE=$(find_engine) || die "$ENGINE"
        timed bases bases
        timed operator build "$OPERATOR_TAG" operator/Dockerfile . "PYTHON_IMAGE=$PYTHON_BASE" operator
        timed postfix build "$POSTFIX_TAG" images/postfix/Dockerfile images/postfix "DEBIAN_IMAGE=$DEBIAN_BASE"
        echo "$OPERATOR_TAG"
        echo "$POSTFIX_TAG" ;;
    *)
        die "usage: $0 [images|bases|standins|engine]" ;;
esac
