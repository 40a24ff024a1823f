"""CI tools through kvmc: gitlab-ci-local's docker executor against `kvmc serve`
(ci/gitlab-local.sh) and GitLab Runner's custom executor protocol (ci/gitlab-runner/).

gitlab-runner cannot be installed on these machines, so the custom executor's stages are
called exactly as its documentation says the runner calls them: CUSTOM_ENV_* job variables,
BUILD_FAILURE_EXIT_CODE / SYSTEM_FAILURE_EXIT_CODE, `run SCRIPT STAGE` once per sub-stage.
VM boots are few on purpose (TCG): one three-job pipeline, one one-job pipeline, two job VMs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import Kvmc

ROOT = Path(__file__).resolve().parents[2]
GITLAB_LOCAL = ROOT / "ci" / "gitlab-local.sh"
DRIVER = ROOT / "ci" / "gitlab-runner"
BUILD_FAILURE, SYSTEM_FAILURE = 41, 42
RUN_ROOT = Path("/run/kvmc/tests")

PIPELINE = """\
stages: [build, test]
variables:
  GREETING: hello
build:
  stage: build
  image: kvmc/busybox
  before_script: [echo "before $GREETING"]
  script:
    - mkdir -p out deps && echo "$GREETING from build" > out/msg.txt && echo cached > deps/c.txt
  after_script: [echo "after $CI_JOB_NAME"]
  cache: {key: deps, paths: [deps/]}
  artifacts: {paths: [out/]}
service:
  stage: build
  image: {name: kvmc/busybox, entrypoint: [""]}
  services:
    - name: kvmc/busybox
      alias: web
      command: ["sh", "-c", "mkdir -p /w && echo svc-ok > /w/index.html && httpd -f -p 8080 -h /w"]
  script:
    - for i in $(seq 120); do wget -qO- http://web:8080/ > got.txt 2>/dev/null && break; sleep 1; done
    - grep svc-ok got.txt
test:
  stage: test
  image: kvmc/busybox
  cache: {key: deps, paths: [deps/], policy: pull}
  script:
    - cat out/msg.txt deps/c.txt
    - grep -q "hello from build" out/msg.txt
    - grep -q cached deps/c.txt
"""

FAILING = """\
broken:
  image: kvmc/busybox
  script: [echo about to fail, exit 3]
"""


def _repo(path: Path, pipeline: str) -> Path:
    path.mkdir()
    (path / ".gitlab-ci.yml").write_text(pipeline)
    git = ["git", "-c", "user.email=ci@kvmc", "-c", "user.name=kvmc"]
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=path, check=True)
    subprocess.run([*git, "commit", "-qm", "pipeline"], cwd=path, check=True)
    return path


def _leftovers(kvmc: Kvmc, run_dir: Path | None = None) -> dict[str, list[str]]:
    volumes = kvmc("volume", "ls", "-q", check=True).stdout.decode().split()
    networks = [line.split()[1] for line in kvmc("network", "ls", check=True).stdout.decode().splitlines()[1:]]
    return {
        "containers": kvmc("ps", "-aq", check=True).stdout.decode().split(),
        "domains": sorted(kvmc.domains()),
        "volumes": [v for v in volumes if v.startswith("gcl-")],
        "networks": [n for n in networks if n.startswith("gitlab-ci-local")],
        "sockets": sorted(str(p) for p in run_dir.iterdir()) if run_dir else [],
    }


def _gitlab_local(kvmc: Kvmc, repo: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
    """The script as a user runs it; its private server's socket directory goes in ``run_dir``
    (under /run/kvmc: a socket path must stay short)."""
    env = {**kvmc.env, "KVMC": f"{sys.executable} -m kvmc", "KVMC_GCL_RUN_DIR": str(run_dir)}
    env.pop("DOCKER_HOST", None)
    return subprocess.run([str(GITLAB_LOCAL)], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)


def test_gitlab_local_pipeline_with_artifacts_cache_and_a_service(kvmc: Kvmc, tmp_path: Path) -> None:
    repo = _repo(tmp_path / "project", PIPELINE)
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="gcl", dir=RUN_ROOT))
    proc = _gitlab_local(kvmc, repo, run_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for line in ("before hello", "after build", "hello from build", "svc-ok", "cached",
                 "PASS  build", "PASS  service", "PASS  test"):
        assert line in out, f"{line!r} not in the pipeline's output:\n{out[-6000:]}"
    left = _leftovers(kvmc, run_dir)
    run_dir.rmdir()
    assert not any(left.values()), f"left behind: {left}"


def test_gitlab_local_failing_job_fails_the_pipeline(kvmc: Kvmc, tmp_path: Path) -> None:
    repo = _repo(tmp_path / "failing", FAILING)
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="gcl", dir=RUN_ROOT))
    proc = _gitlab_local(kvmc, repo, run_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "about to fail" in out and "FAIL" in out, out[-4000:]
    left = _leftovers(kvmc, run_dir)
    run_dir.rmdir()
    assert not any(left.values()), f"left behind: {left}"


# ------------------------------------------------------------------ custom executor

def _job_env(kvmc: Kvmc, job_id: int, **custom: str) -> dict[str, str]:
    """What gitlab-runner gives each driver call: the job's variables as CUSTOM_ENV_*."""
    env = {**kvmc.env, "KVMC": f"{sys.executable} -m kvmc",
           "BUILD_FAILURE_EXIT_CODE": str(BUILD_FAILURE), "SYSTEM_FAILURE_EXIT_CODE": str(SYSTEM_FAILURE),
           "CUSTOM_ENV_CI_JOB_ID": str(job_id), "CUSTOM_ENV_CI_PROJECT_ID": "5",
           "CUSTOM_ENV_CI_RUNNER_ID": "9", "CUSTOM_ENV_CI_CONCURRENT_PROJECT_ID": "0",
           "CUSTOM_ENV_CI_BUILDS_DIR": "/builds"}
    env.update({f"CUSTOM_ENV_{k}": v for k, v in custom.items()})
    return env


def _stage(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DRIVER / name), *args], env=env, capture_output=True, text=True, timeout=600)


def _script(tmp_path: Path, name: str, body: str) -> str:
    """A sub-stage script as the runner writes it for shell bash."""
    path = tmp_path / name
    path.write_text(f"#!/usr/bin/env bash\nset -eo pipefail\n{body}\n")
    return str(path)


def _one_job(kvmc: Kvmc, tmp_path: Path, job_id: int) -> list[str]:
    """config, prepare, three run stages, cleanup; returns what went wrong (nothing)."""
    problems = []
    env = _job_env(kvmc, job_id)
    config = _stage("config", env)
    data = json.loads(config.stdout)
    if data["builds_dir"] != "/builds" or data["driver"]["name"] != "kvmc" or str(job_id) not in data["hostname"]:
        problems.append(f"config: {data}")
    try:
        prepare = _stage("prepare", env)
        if prepare.returncode != 0:
            return [f"prepare exited {prepare.returncode}: {prepare.stderr}"]
        write = _stage("run", env, _script(tmp_path, f"w{job_id}", f"echo job-{job_id} > /builds/shared.txt"),
                       "build_script")
        read = _stage("run", env, _script(tmp_path, f"r{job_id}", "cat /builds/shared.txt; echo $BASH_VERSION"),
                      "after_script")
        if write.returncode != 0 or read.returncode != 0 or f"job-{job_id}" not in read.stdout:
            problems.append(f"run stages: {write.returncode} {read.returncode} {read.stdout!r} {read.stderr!r}")
        if not read.stdout.split("\n")[1].startswith("5."):
            problems.append(f"the default image has no bash: {read.stdout!r}")
        fail = _stage("run", env, _script(tmp_path, f"f{job_id}", "echo failing; false; echo not reached"),
                      "step_script")
        if fail.returncode != BUILD_FAILURE or "not reached" in fail.stdout:
            problems.append(f"a failing script exited {fail.returncode}, not {BUILD_FAILURE}: {fail.stdout!r}")
    finally:
        cleanup = _stage("cleanup", env)
        if cleanup.returncode != 0:
            problems.append(f"cleanup exited {cleanup.returncode}: {cleanup.stderr}")
    return problems


def test_custom_executor_two_jobs_in_parallel(kvmc: Kvmc, tmp_path: Path) -> None:
    """Two concurrent jobs: each its own VM, files kept between its stages, a failing script
    is a build failure, cleanup leaves no container or domain."""
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda job: _one_job(kvmc, tmp_path, job), (101, 102)))
    assert results == [[], []]
    left = _leftovers(kvmc)
    assert not left["containers"] and not left["domains"], left


def test_custom_executor_cleanup_after_a_failed_prepare(kvmc: Kvmc) -> None:
    env = _job_env(kvmc, 103, CI_JOB_IMAGE="127.0.0.1:9/no-such-image:1")
    prepare = _stage("prepare", env)
    assert prepare.returncode == SYSTEM_FAILURE, prepare.stderr
    cleanup = _stage("cleanup", env)
    assert cleanup.returncode == 0, cleanup.stderr
    again = _stage("cleanup", env)  # cleanup always runs, also when nothing is left
    assert again.returncode == 0, again.stderr
    left = _leftovers(kvmc)
    assert not left["containers"] and not left["domains"], left
