#!/usr/bin/env bash
# End-to-end. The Makefile calls:
#   bash tests/e2e/run.sh kind-up   create the kind cluster, build both images, load them
#   bash tests/e2e/run.sh deploy    install the operator (helm if present, else kustomize)
#                                   and the example Postfix instance "relay" (namespace mail)
#                                   into the kind cluster, or the context KUBE_CONTEXT
#   bash tests/e2e/run.sh e2e       with docker and kind: kind-up + deploy, then verify:
#                                   apply the example policies, wait for Ready, and check
#                                   the live tables in every relay pod with postmap -q.
#                                   Without them: the same on this machine's real control
#                                   plane, controllers and kwok (python -m tests.e2e.local,
#                                   which brings it up, then runs `run.sh local` on it).
#   bash tests/e2e/run.sh local     (called by tests/e2e/local.py) the operator's rollout and
#                                   leader, the example Postfix, then verify, against the
#                                   context KUBE_CONTEXT of $KUBECONFIG
# Every wait is bounded (E2E_TIMEOUT, default 180s).
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${KIND_CLUSTER:-mailtls-e2e}
# `deploy` alone may target any cluster: KUBE_CONTEXT=my-context make deploy
CONTEXT=${KUBE_CONTEXT:-kind-$CLUSTER}
TIMEOUT=${E2E_TIMEOUT:-180s}
# The images the manifests name (chart default image, example Postfix Deployment), so
# the loaded images are used as they are (imagePullPolicy IfNotPresent).
OPERATOR_IMAGE=ghcr.io/mailtls/mailtls-operator:0.1.0
POSTFIX_IMAGE=mailtls-example-postfix:0.1.0
NS_OPERATOR=mailtls-system
# The operator's pods (the chart's selector labels; two replicas, one leader).
OPERATOR_SELECTOR=app.kubernetes.io/name=mailtls-operator,app.kubernetes.io/instance=mailtls-operator
NS_MAIL=mail
TABLE_DIR=/var/lib/mailtls
REVISION_KEY=mailtls-revision.invalid

log() { printf '\n== %s\n' "$*"; }
skip() { echo "e2e skipped: $*"; exit 0; }
k() { kubectl --context "$CONTEXT" --request-timeout=30s "$@"; }

# Why kind cannot run here (empty: it can).
no_kind() {
    command -v docker >/dev/null 2>&1 || { echo "docker is not installed"; return; }
    timeout 20 docker info >/dev/null 2>&1 || { echo "no container engine (docker info failed)"; return; }
    command -v kind >/dev/null 2>&1 || { echo "kind is not installed (https://kind.sigs.k8s.io)"; return; }
    command -v kubectl >/dev/null 2>&1 || { echo "kubectl is not installed"; return; }
}

preflight() {
    local why
    why=$(no_kind)
    [ -z "$why" ] || skip "$why"
}

diagnose() {
    local rc=$?
    [ "$rc" = 0 ] && return
    echo "e2e FAILED (exit $rc); cluster state follows" >&2
    k get mailtlspolicies -A -o yaml >&2 || true
    k -n "$NS_MAIL" get pods,configmaps -o wide >&2 || true
    k -n "$NS_OPERATOR" get lease mailtls-operator -o yaml >&2 || true
    # Every replica: the leader's log is the interesting one, the standby says so.
    k -n "$NS_OPERATOR" logs -l "$OPERATOR_SELECTOR" --prefix --tail=200 >&2 || true
    k get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 40 >&2 || true
}

kind_up() {
    preflight
    if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
        log "kind cluster $CLUSTER exists"
    else
        log "creating kind cluster $CLUSTER"
        kind create cluster --name "$CLUSTER" --wait 120s ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
    fi
    log "building $OPERATOR_IMAGE and $POSTFIX_IMAGE"
    # The same build as `make images` (official bases, or local stand-ins where no
    # registry answers), with docker, under the names the manifests use.
    CONTAINER_ENGINE=docker OPERATOR_TAG="$OPERATOR_IMAGE" POSTFIX_TAG="$POSTFIX_IMAGE" \
        bash images/build.sh images
    log "loading the images into $CLUSTER"
    kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$POSTFIX_IMAGE"
}

deploy() {
    command -v kubectl >/dev/null 2>&1 || skip "kubectl is not installed"
    k cluster-info >/dev/null 2>&1 || skip "no cluster at context $CONTEXT (run: make kind-up)"
    if command -v helm >/dev/null 2>&1 && [ "${E2E_KUSTOMIZE:-0}" != 1 ]; then
        log "installing the chart with helm"
        helm --kube-context "$CONTEXT" upgrade --install mailtls-operator \
            charts/mailtls-operator --namespace "$NS_OPERATOR" --create-namespace \
            --wait --timeout "$TIMEOUT"
    else
        log "installing manifests/base with kubectl (no helm here)"
        k apply --server-side --field-manager=mailtls-e2e -k manifests/base
    fi
    k -n "$NS_OPERATOR" rollout status deploy/mailtls-operator --timeout="$TIMEOUT"
    check_leader
    deploy_postfix
}

deploy_postfix() {
    log "deploying the example Postfix instance relay"
    k apply --server-side --field-manager=mailtls-e2e -k manifests/examples/postfix
    k -n "$NS_MAIL" rollout status deploy/relay --timeout="$TIMEOUT"
}

# Leader election: the Lease mailtls-operator is held by one of the operator pods (the
# replicas elect on it; the holder's identity is its pod name).
check_leader() {
    local holder pods bound=${TIMEOUT%s} deadline
    case $bound in *m) bound=$(( ${bound%m} * 60 )) ;; *[!0-9]*|'') bound=180 ;; esac
    deadline=$((SECONDS + bound))
    log "waiting for a leader (Lease $NS_OPERATOR/mailtls-operator)"
    pods=" $(k -n "$NS_OPERATOR" get pods -l "$OPERATOR_SELECTOR" \
        --field-selector=status.phase=Running -o jsonpath='{.items[*].metadata.name}') "
    while :; do
        holder=$(k -n "$NS_OPERATOR" get lease mailtls-operator \
            -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
        if [ -n "$holder" ] && [[ "$pods" == *" $holder "* ]]; then
            echo "ok   leader $holder of:$pods"
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "FAIL: Lease holder '$holder' is none of the operator pods:$pods" >&2
            return 1
        fi
        sleep 2
    done
}

# postmap -q KEY in one pod's table; prints the value, or nothing for a miss.
query() {
    local pod=$1 table=$2 key=$3
    k -n "$NS_MAIL" exec "$pod" -c postfix -- \
        postmap -q "$key" "lmdb:$TABLE_DIR/$table" 2>/dev/null || true
}

expect() {
    local pod=$1 table=$2 key=$3 want=$4 got
    got=$(query "$pod" "$table" "$key")
    case "$got" in
        $want) echo "ok   $pod $table: $key -> $got" ;;
        *) echo "FAIL $pod $table: $key -> '${got}', want '$want'" >&2; return 1 ;;
    esac
}

wait_ready() {
    local names
    names=$(k -n "$NS_MAIL" get mailtlspolicies \
        -o jsonpath='{range .items[?(@.spec.mode!="audit")]}{.metadata.name}{" "}{end}')
    log "waiting for Ready: $names"
    for name in $names; do
        k -n "$NS_MAIL" wait --for=condition=Ready --timeout="$TIMEOUT" "mailtlspolicy/$name"
        k -n "$NS_MAIL" wait --timeout="$TIMEOUT" "mailtlspolicy/$name" \
            --for=jsonpath='{.status.observedGeneration}'="$(k -n "$NS_MAIL" get \
            "mailtlspolicy/$name" -o jsonpath='{.metadata.generation}')"
    done
}

check_pods() {
    local revision applied pods pod
    revision=$(k -n "$NS_MAIL" get configmap relay-mailtls \
        -o jsonpath='{.metadata.annotations.mailtls\.io/revision}')
    [ -n "$revision" ] || { echo "FAIL: no revision on ConfigMap relay-mailtls" >&2; return 1; }
    log "revision $revision: checking every relay pod"
    pods=$(k -n "$NS_MAIL" get pods -l mailtls.io/instance=relay \
        --field-selector=status.phase=Running -o jsonpath='{.items[*].metadata.name}')
    [ -n "$pods" ] || { echo "FAIL: no running relay pods" >&2; return 1; }
    for pod in $pods; do
        applied=$(k -n "$NS_MAIL" get pod "$pod" \
            -o jsonpath='{.metadata.annotations.mailtls\.io/applied-revision}')
        if [ "$applied" = "$revision" ]; then
            echo "ok   $pod annotated mailtls.io/applied-revision=$applied"
        else
            echo "FAIL $pod applied-revision '$applied', want $revision" >&2
            return 1
        fi
        expect "$pod" tls_policy "$REVISION_KEY" "secure match=rev-${revision:0:16}"
        expect "$pod" tls_policy example.com "secure *"
        expect "$pod" tls_policy .example.com "secure *"
        expect "$pod" tls_policy payroll.example.com "encrypt *"
        # An internationalised destination: both the A-label and the U-label.
        expect "$pod" tls_policy xn--bcher-kva.example "encrypt *"
        expect "$pod" tls_policy "bücher.example" "encrypt *"
        expect "$pod" tls_policy "[fax-gw.internal.example]:25" "none"
        expect "$pod" transport insurer.example.com "smtp:*"
        # Audit mode writes nothing.
        expect "$pod" tls_policy supplier.example ""
    done
}

e2e() {
    local why
    why=$(no_kind)
    if [ -n "$why" ]; then
        log "no kind here ($why): end to end on this machine's control plane and kwok"
        exec "${PYTHON:-.venv/bin/python}" -m tests.e2e.local
    fi
    kind_up
    deploy
    verify
}

# The operator (a local process playing one of the chart's pods) is up: its Deployment's
# rollout, its leader, then the example Postfix and the checks, on the local cluster.
local_run() {
    command -v kubectl >/dev/null 2>&1 || { echo "kubectl is not on PATH" >&2; exit 1; }
    k -n "$NS_OPERATOR" rollout status deploy/mailtls-operator --timeout="$TIMEOUT"
    check_leader
    deploy_postfix
    verify
}

verify() {
    trap diagnose EXIT
    log "applying the example policies"
    k apply --server-side --field-manager=mailtls-e2e -k manifests/examples
    wait_ready
    check_pods

    log "changing a policy: newsletter-partner may -> encrypt"
    k -n "$NS_MAIL" patch mailtlspolicy newsletter-partner --type=merge \
        -p '{"spec":{"level":"encrypt","protocols":">=TLSv1.2"}}'
    wait_ready
    for pod in $(k -n "$NS_MAIL" get pods -l mailtls.io/instance=relay \
            --field-selector=status.phase=Running -o jsonpath='{.items[*].metadata.name}'); do
        expect "$pod" tls_policy newsletter.example.net "encrypt *"
    done
    check_pods

    log "an invalid policy is refused by the API server (CEL rule)"
    if k -n "$NS_MAIL" apply --dry-run=server -f - >/dev/null 2>&1 <<'POLICY'
apiVersion: mailtls.io/v1alpha1
kind: MailTLSPolicy
metadata: {name: bad-tafile, namespace: mail}
spec: {destinations: [bad.example], level: may, tafile: [/etc/postfix/tls/partner-ca.pem]}
POLICY
    then
        echo "FAIL: the API server accepted tafile with level may" >&2
        return 1
    fi
    echo "ok   refused"
    log "e2e passed"
}

case "${1:-}" in
    kind-up) kind_up ;;
    deploy) deploy ;;
    e2e) e2e ;;
    local) local_run ;;
    *) echo "usage: $0 kind-up|deploy|e2e|local" >&2; exit 2 ;;
esac
