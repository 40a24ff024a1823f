"""CI jobs on kvmc: wall time of a 3-job pipeline through the GitLab Runner custom executor
driver (ci/gitlab-runner/), with cold VMs against pooled ones, in one run.

Each job is what gitlab-runner does with the driver: config, prepare (the job's VM),
three run sub-stages (get_sources, step_script, after_script: small scripts sharing files in
the VM), cleanup; the three jobs run one after another as three stages would. Cold: every
prepare boots a VM (--no-pool). Pooled: `kvmc pool warm IMAGE --size 3` first (its time is
listed apart: paid once, ahead of the jobs), then KVMC_GITLAB_POOL=1, so each prepare
restores a saved member instead of booting. Target under TCG: pooled/cold <= 0.7.
Run with: .venv/bin/python bench/ci.py [--image kvmc/ci-helper:latest] [--memory 256m]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "ci" / "gitlab-runner"
JOBS = 3
TARGET = 0.7


def kvmc(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "kvmc", *args], capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"kvmc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}")


def stage(name: str, env: dict[str, str], *args: str) -> None:
    proc = subprocess.run([str(DRIVER / name), *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"driver stage {name} {' '.join(args)} exited {proc.returncode}: {proc.stderr}")


def pipeline(image: str, memory: str, pooled: bool, scripts: Path, first_job: int) -> float:
    """Wall time of JOBS jobs, each config/prepare/3 runs/cleanup."""
    start = time.perf_counter()
    for job in range(first_job, first_job + JOBS):
        env = {**os.environ, "KVMC": f"{sys.executable} -m kvmc", "KVMC_GITLAB_MEMORY": memory,
               "KVMC_GITLAB_POOL": "1" if pooled else "0", "CUSTOM_ENV_CI_JOB_IMAGE": image,
               "CUSTOM_ENV_CI_JOB_ID": str(job), "CUSTOM_ENV_CI_PROJECT_ID": "1", "CUSTOM_ENV_CI_RUNNER_ID": "1",
               "BUILD_FAILURE_EXIT_CODE": "41", "SYSTEM_FAILURE_EXIT_CODE": "42"}
        stage("config", env)
        try:
            stage("prepare", env)
            for name in ("get_sources", "step_script", "after_script"):
                stage("run", env, str(scripts / name), name)
        finally:
            stage("cleanup", env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="kvmc/ci-helper:latest")
    parser.add_argument("--memory", default="256m")
    args = parser.parse_args()
    if args.image == "kvmc/ci-helper:latest":
        kvmc("image", "build-ci-helper")
    with tempfile.TemporaryDirectory(prefix="kvmc-bench-ci-") as tmp:
        scripts = Path(tmp)
        (scripts / "get_sources").write_text("set -eo pipefail\nmkdir -p /builds/p && echo src > /builds/p/f\n")
        (scripts / "step_script").write_text("set -eo pipefail\ncd /builds/p && cat f && echo built > out\n")
        (scripts / "after_script").write_text("set -eo pipefail\ncat /builds/p/out\n")
        cold = pipeline(args.image, args.memory, False, scripts, 9100)
        start = time.perf_counter()
        kvmc("pool", "warm", args.image, "--size", str(JOBS), "-m", args.memory)
        warm = time.perf_counter() - start
        pooled = pipeline(args.image, args.memory, True, scripts, 9200)
        kvmc("pool", "rm", args.image)
    ratio = pooled / cold
    print(f"{'pipeline of 3 jobs (custom executor)':<40}{'wall s':>10}{'ratio':>8}{'target':>9}")
    print(f"{'cold VMs (--no-pool)':<40}{cold:>10.1f}{1.0:>8.2f}{'':>9}")
    print(f"{'pooled VMs (pool warm --size 3 first)':<40}{pooled:>10.1f}{ratio:>8.2f}{'<= ' + str(TARGET):>9}")
    print(f"{'  pool warm itself (paid ahead of jobs)':<40}{warm:>10.1f}{'':>8}{'':>9}")
    print(f"pooled/cold {ratio:.2f} (target <= {TARGET}): {'ok' if ratio <= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
