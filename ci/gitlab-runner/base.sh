# Shared by the four stages of kvmc's GitLab Runner custom executor driver (sourced, not run).
# The driver is thin on purpose: every VM operation is one kvmc CLI call.
#
# Settings (config.toml [[runners]] environment, or the runner's own environment):
#   KVMC                          the kvmc command (default: this checkout's .venv/bin/kvmc, else kvmc)
#   KVMC_GITLAB_DEFAULT_IMAGE     the image of jobs without `image:` (default kvmc/ci-helper:latest:
#                                 busybox with bash, which the runner's scripts need)
#   KVMC_GITLAB_MEMORY            the job VM's memory (kvmc run -m; default: kvmc's)
#   KVMC_GITLAB_POOL              1: claim pooled VMs (warm the pool once with `kvmc pool warm
#                                 IMAGE --size N -m MEM`; KVMC_POOL_REFILL=1 refills it after claims)
# The job's VM is named from the runner, project, concurrency slot and job ids, so concurrent
# jobs never share one, and labelled gitlab.job so leftovers are easy to find.

driver_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -n "${KVMC:-}" ]; then
    read -r -a kvmc <<<"$KVMC"
elif [ -x "$driver_root/.venv/bin/kvmc" ]; then
    kvmc=("$driver_root/.venv/bin/kvmc")
else
    kvmc=(kvmc)
fi

vm_name="gl-runner-${CUSTOM_ENV_CI_RUNNER_ID:-0}-project-${CUSTOM_ENV_CI_PROJECT_ID:-0}-concurrent-${CUSTOM_ENV_CI_CONCURRENT_PROJECT_ID:-0}-job-${CUSTOM_ENV_CI_JOB_ID:?CUSTOM_ENV_CI_JOB_ID is not set (gitlab-runner sets it)}"
build_failure=${BUILD_FAILURE_EXIT_CODE:-1}
system_failure=${SYSTEM_FAILURE_EXIT_CODE:-2}

system_failure() {
    echo "kvmc driver: $*" >&2
    exit "$system_failure"
}
