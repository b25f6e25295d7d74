# mailtls-operator: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEB_PACKAGES := postfix postfix-lmdb postfix-cdb lua5.1 lua-cjson prometheus
# The image tests (tests/images) and `make images`: podman with Debian's runc (crun fails
# on these machines: cgroups in hybrid mode) and mmdebstrap for the local stand-in bases
# where no registry is reachable (images/build.sh).
DEB_IMAGES := podman runc mmdebstrap
# kubectl (for `kubectl kustomize`) is installed when the machine's apt sources have it;
# without it the kustomize contract tests are skipped with that reason.
DEB_OPTIONAL := kubectl
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install system-deps test test-unit test-postfix test-integration lint bench demo \
        images e2e kind-up deploy clean controlplane dashboard dashboard-png

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with its test extras

system-deps: ## install Debian packages the tests and demo need (postfix, lua, podman, kubectl), and the Postfix 3.10 root
	@missing=""; for p in $(DEB_PACKAGES) $(DEB_IMAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  echo "postfix postfix/main_mailer_type select No configuration" | $$SUDO debconf-set-selections; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null || \
	  { $$SUDO apt-get update -q >/dev/null && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	fi
	@$(PY) -c 'import sys; sys.path.insert(0, "testbed"); import postfixroot; sys.exit(postfixroot.ensure())' || \
	  echo "note: no Postfix 3.10 root: the 3.10 half of the Postfix tests is skipped with the reason"
	@for p in $(DEB_OPTIONAL); do \
	  command -v $$p >/dev/null || { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$p >/dev/null 2>&1 || \
	    echo "note: $$p is not installable here; the tests that need it are skipped"; }; \
	done

# The real control plane (etcd, kube-apiserver, kubectl, kube-controller-manager,
# kube-scheduler, kwok) compiled from the pinned Go modules in tools/ into
# ~/.cache/mailtls/controlplane/<versions>/ (KUBEBUILDER_ASSETS from setup-envtest is used
# instead when set). The test bed finds the directory the same way: testbed/controlplane.py
# runs tools/build.sh, which only prints the directory once it is built.
controlplane: ## build etcd + kube-apiserver + kubectl (+ kwok, controller-manager, scheduler) from Go modules, cached; prints the directory
	@bash tools/build.sh

# One process: the tiers on the real control plane share its etcd, kube-apiserver and
# kwok (tests/conftest.py). The agent-test hang that once split the run in three was a
# cancellation lost in asyncio.wait_for (tests/unit/test_runner_cancellation.py).
test: system-deps install controlplane ## install everything needed, then run the whole suite but e2e
	$(BIN)/pytest -q -p no:cacheprovider

test-unit: install ## unit and contract tests only (no Postfix, no API server)
	$(BIN)/pytest -q tests/unit tests/contract

lint: install ## ruff, mypy --strict and the import-linter layer contract
	$(BIN)/ruff check operator testbed tests bench demo tools/dashboard.py tools/dashboard_png.py
	$(BIN)/mypy
	$(BIN)/mypy --strict tools/dashboard.py tools/dashboard_png.py
	$(BIN)/lint-imports

bench: system-deps install controlplane ## benchmarks: print figures and ratios, write bench/results/*.json
	$(BIN)/python -m bench

demo: system-deps install controlplane ## the whole job on this machine: kube-apiserver + kwok, mailtls run, real Postfix pods, real mail
	$(BIN)/python -m demo

dashboard: install ## regenerate the chart's Grafana dashboard JSON from tools/dashboard.py
	$(BIN)/python tools/dashboard.py

dashboard-png: system-deps install controlplane ## run the dashboard test against a real Prometheus and redraw docs/dashboard.png from it
	MAILTLS_DASHBOARD_PNG=docs/dashboard.png $(BIN)/pytest -q -p no:cacheprovider tests/cluster/operating/test_dashboard_prometheus.py

images: system-deps ## build localhost/mailtls-operator:dev and localhost/mailtls-postfix:dev (podman or docker)
	@bash images/build.sh images

# With docker and kind: on kind (images built and loaded). Without: on this machine's real
# control plane with the controller-manager, the scheduler and kwok, the chart rendered by
# the Helm SDK, the operator a local process, Postfix pods through kwok (tests/e2e/local.py).
e2e: system-deps install controlplane ## end-to-end: on kind where docker+kind exist, else on the real control plane + kwok here
	@PYTHON=$(BIN)/python bash tests/e2e/run.sh e2e

kind-up: ## create a kind cluster and load the images
	@bash tests/e2e/run.sh kind-up

deploy: ## install the chart and the example Postfix into the current cluster
	@bash tests/e2e/run.sh deploy

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .demo
