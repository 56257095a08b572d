#!/usr/bin/env bash
# Install the CRD validators the chart tests check custom resources with (ServiceMonitor, PrometheusRule,
# KEDA ScaledObject/TriggerAuthentication), into <repo>/.tools/crd/node_modules, from the npm registry:
# @kubernetes-models/* ship ajv validators compiled from the upstream projects' CRD OpenAPI schemas
# (kubernetes-validate ships the core API only). Idempotent. Prints the node_modules folder.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$REPO_ROOT/.tools/crd"
# Pinned: a new schema release must not change what the tests accept without a commit.
PACKAGES=(@kubernetes-models/prometheus-operator@6.0.0 @kubernetes-models/keda@2.0.0)
STAMP="$PREFIX/.installed-$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" ]]; then
  echo "$PREFIX/node_modules"
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "install-crd-schemas: npm is required (Node.js >= 18)" >&2; exit 1; }
mkdir -p "$PREFIX"
# A package.json of its own, so that npm installs here and never walks up into the repository.
[[ -f "$PREFIX/package.json" ]] || echo '{"name": "pwff-crd-schemas", "private": true}' >"$PREFIX/package.json"
echo "install-crd-schemas: installing ${PACKAGES[*]}" >&2
npm install --prefix "$PREFIX" --no-audit --no-fund --loglevel=error "${PACKAGES[@]}" >&2
touch "$STAMP"
echo "$PREFIX/node_modules"
