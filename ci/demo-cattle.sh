#!/usr/bin/env bash
# "Container host as cattle" (make demo-cattle): a disposable VM running Docker Engine builds an
# image onto a cache volume and is thrown away; a second host on the same cache runs the image
# without building it. No registry: the base image is made here from busybox-static and loaded.
set -euo pipefail
cd "$(dirname "$0")/.."
kvmc=.venv/bin/kvmc
work=$(mktemp -d)
trap '$kvmc host rm demo1 demo2 >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

echo "==> a base image for FROM: busybox-static as a docker-archive"
.venv/bin/python - "$work" <<'PY'
import sys
from pathlib import Path
from kvmc.images import build_busybox_layout
from tests.e2e.docker_clients import docker_save_tarball
work = Path(sys.argv[1])
docker_save_tarball(build_busybox_layout(work / "bb", "latest"), "latest", work / "bb.tar", "demo/busybox:1")
PY
printf 'FROM demo/busybox:1\nRUN echo "built on $(hostname) at $(date)" > /built\nCMD ["cat", "/built"]\n' > "$work/Dockerfile"

echo "==> kvmc host create demo1 --cache demo-cache"
export DOCKER_HOST=$($kvmc host create demo1 --cache demo-cache --ttl 1h | tail -n1)
echo "    DOCKER_HOST=$DOCKER_HOST"
docker load -i "$work/bb.tar"
DOCKER_BUILDKIT=0 docker build -t demo/app:1 "$work"
docker run --rm demo/app:1
$kvmc host rm demo1

echo "==> kvmc host create demo2 --cache demo-cache (the same cache: no build)"
export DOCKER_HOST=$($kvmc host create demo2 --cache demo-cache --ttl 1h | tail -n1)
docker images demo/app
docker run --rm demo/app:1
$kvmc host rm demo2
$kvmc host ls
echo "(the cache volume demo-cache stays: kvmc volume rm demo-cache)"
