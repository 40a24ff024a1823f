"""Start-up and memory: cold boots against pooled (saved, pre-booted) VMs, hot pool members and VM-template clones.

Median of N runs each of `kvmc run --rm IMAGE true` (--rm: every run also pays for removing
its container): cold (--no-pool); pooled (a member
warmed beforehand is restored from its save file); hot (`pool warm --hot`: the member was
restored ahead of time and waits paused, the run resumes it); and from a template (`pool warm
--template`: each run clones the template's RAM file and device state), all at the same VM
size; the same cold through ``kvmc serve`` with the stock docker CLI (``docker run --rm IMAGE
true``), and through a ``kvmc serve`` with its automatic pools from the second run on (each
run after the server refilled its pool); hot template clones (``pool warm --template --hot``);
and `kvmc run IMAGE true` without --rm (the container is kept; removed outside the
timing) cold and hot. Then the proportional set size (PSS) of the hot members waiting paused, and of N idle
VMs of each kind (`run -d IMAGE sleep`), summed over their QEMU processes; then the ratios to
cold (target under TCG: start-up <= 0.25) and PSS save-pool/cold and template/save-pool. A
clone's PSS counts its share of the template's RAM file pages it maps; the file's other pages
(tmpfs, paid once per template) are listed apart.
Run with: .venv/bin/python bench/startup.py [--runs 5] [--image kvmc/busybox] [--memory 128m]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kvmc.process import parse_memory

from kvmc_bytecode import compile_kvmc


def kvmc(*args: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kvmc", *args], capture_output=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"kvmc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return wall, proc.stdout


def data_dir() -> Path:
    """kvmc's state root (where the pool lives), as kvmc itself resolves it."""
    from kvmc.config import load_config

    return load_config().data_dir


def qemu_pss_kib(domain: str) -> int:
    """PSS of the QEMU process behind a libvirt domain (libvirt writes its pid file)."""
    pid = Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip()
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss for {domain}")


def idle_pss(image: str, memory: str, runs: int, mode: str) -> float:
    """Mean PSS (MiB) of ``runs`` idle VMs running side by side; mode cold | pool | template
    (for pool, members are warmed here; for template, the template must exist)."""
    names = [f"bench-idle-{os.getpid()}-{mode[0]}{i}" for i in range(runs)]
    if mode == "pool":
        kvmc("pool", "warm", image, "--size", str(runs), "-m", memory)
    try:
        for name in names:
            kvmc("run", "-d", "--name", name, "-m", memory, *(["--no-pool"] if mode == "cold" else []),
                 image, "sleep", "600")
        time.sleep(3)  # let the guests settle into idle
        infos = [json.loads(kvmc("inspect", n)[1])[0] for n in names]
        wanted = {"cold": "cold", "pool": "pool", "template": "template"}[mode]
        if any(i["Kvmc"]["Boot"] != wanted for i in infos):
            sys.exit(f"idle {mode} VMs booted as {[i['Kvmc']['Boot'] for i in infos]}")
        return statistics.mean(qemu_pss_kib(i["Kvmc"]["Domain"]) for i in infos) / 1024
    finally:
        subprocess.run([sys.executable, "-m", "kvmc", "rm", "-f", *names], capture_output=True)


def docker_runs(image: str, memory: str, runs: int, auto_pool: bool = False) -> list[float]:
    """Wall times of ``docker run --rm IMAGE true`` (the stock docker CLI) through a ``kvmc serve``
    started here on a private socket, on the same state root: the API path against kvmc's CLI.

    Without ``auto_pool`` the server has no automatic pools (auto_pool_budget 0): every run
    boots cold. With it, one run first (not timed: it teaches the server the image), then each
    timed run waits until the server's automatic pool holds a hot VM again, as a user's runs
    spaced by more than a refill would: the steady state of "second run onwards"."""
    socket_path = Path(f"/run/kvmc/bench-{os.getpid()}.sock")
    server_env = {**os.environ, "KVMC_AUTO_POOL_BUDGET": os.environ.get("KVMC_AUTO_POOL_BUDGET", "10%")
                  if auto_pool else "0"}
    server = subprocess.Popen([sys.executable, "-m", "kvmc", "serve", "-H", f"unix://{socket_path}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=server_env)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env["DOCKER_HOST"] = f"unix://{socket_path}"

    def run() -> float:
        start = time.perf_counter()
        proc = subprocess.run(["docker", "run", "--rm", "-m", memory, image, "true"], env=env, capture_output=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"docker run failed ({proc.returncode}): {proc.stderr.decode()}")
        return wall

    def wait_hot() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rows = map(json.loads, kvmc("pool", "ls", "--format", "json")[1].splitlines())
            if any(r.get("origin") == f"auto:{server.pid}" and r["hot"] and r["memory_mib"] == parse_memory(memory)
                   for r in rows):
                return
            time.sleep(0.5)
        sys.exit("kvmc serve's automatic pool did not refill within 300 s")

    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["docker", "version"], env=env, capture_output=True).returncode != 0:
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit(f"kvmc serve did not come up: {server.stderr.read().decode() if server.stderr else ''}")
            time.sleep(0.2)
        if not auto_pool:
            return [run() for _ in range(runs)]
        run()
        walls = []
        for _ in range(runs):
            wait_hot()
            walls.append(run())
        return walls
    finally:
        server.terminate()
        server.wait(60)


def kept_runs(image: str, memory: str, runs: int, *flags: str) -> list[float]:
    """Wall times of ``kvmc run --name N IMAGE true`` (no --rm); the containers are removed after."""
    names = [f"bench-kept-{os.getpid()}-{i}" for i in range(runs)]
    try:
        return [kvmc("run", "--name", name, "-m", memory, *flags, image, "true")[0] for name in names]
    finally:
        subprocess.run([sys.executable, "-m", "kvmc", "rm", "-f", *names], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="kvmc/busybox")
    parser.add_argument("--memory", default="128m")
    args = parser.parse_args()
    compile_kvmc()  # as an installed kvmc is (bench/kvmc_bytecode.py)
    image, memory, n = args.image, args.memory, args.runs
    memory_mib = parse_memory(memory)

    def pools(mode: str) -> list[dict]:
        return [p for p in map(json.loads, kvmc("pool", "ls", "--format", "json")[1].splitlines())
                if p["mode"] == mode and p["memory_mib"] == memory_mib]

    # Save mode first: while a template of this key exists, runs clone it instead of claiming.
    cold = [kvmc("run", "--rm", "--no-pool", "-m", memory, image, "true")[0] for _ in range(n)]
    docker_cold = docker_runs(image, memory, n)  # before any pool exists, no automatic pools: cold boots too
    docker_auto = docker_runs(image, memory, n, auto_pool=True)  # second run onwards: the server's own pool
    warm_wall, _ = kvmc("pool", "warm", image, "--size", str(n), "-m", memory)
    save_mib = [p["save_mib"] for p in pools("save")]
    pooled = [kvmc("run", "--rm", "-m", memory, image, "true")[0] for _ in range(n)]
    hot_warm_wall, _ = kvmc("pool", "warm", image, "--size", str(n), "--hot", "-m", memory)
    if [p["hot"] for p in pools("save")] != [n]:
        sys.exit(f"expected {n} hot members, found {pools('save')}")
    members = [json.loads(m.read_text()) for m in (data_dir() / "pool").glob("*/member.json")]
    pss_hot_waiting = statistics.mean(qemu_pss_kib(m["domain"]) for m in members
                                      if m["key"]["memory_mib"] == memory_mib) / 1024
    hot = [kvmc("run", "--rm", "-m", memory, image, "true")[0] for _ in range(n)]
    # The same without --rm: the container is kept (removed after the timing).
    cold_kept = kept_runs(image, memory, n, "--no-pool")
    kvmc("pool", "warm", image, "--size", str(n), "--hot", "-m", memory)
    hot_kept = kept_runs(image, memory, n)
    pss_cold = idle_pss(image, memory, n, "cold")
    pss_pool = idle_pss(image, memory, n, "pool")

    template_wall, out = kvmc("pool", "warm", image, "--template", "-m", memory)
    made = b" made " in out
    try:
        [template] = pools("template")
        templated = [kvmc("run", "--rm", "-m", memory, image, "true")[0] for _ in range(n)]
        pss_template = idle_pss(image, memory, n, "template")
        ram_mib = pools("template")[0]["ram_mib"]
        # Hot template clones: made ahead of time from that template, waiting paused.
        kvmc("pool", "warm", image, "--template", "--hot", "--size", str(n), "-m", memory)
        clones = [m for m in (json.loads(p.read_text()) for p in (data_dir() / "pool").glob("*/member.json"))
                  if m["key"]["memory_mib"] == memory_mib and m.get("template")]
        pss_clone_waiting = statistics.mean(qemu_pss_kib(m["domain"]) for m in clones) / 1024
        hot_clone = [kvmc("run", "--rm", "-m", memory, image, "true")[0] for _ in range(n)]
    finally:
        if made:  # leave a template that was there before alone
            kvmc("pool", "rm", image, "--mode", "template")

    med = statistics.median
    print(f"kvmc start-up, image {image}, {memory} VMs, median of {n} (seconds, MiB)")
    print(f"{'measure':<60}{'value':>10}")
    print(f"{'cold     kvmc run --rm IMAGE true (baseline)':<60}{med(cold):>10.3f}")
    print(f"{'pooled   kvmc run --rm IMAGE true (restore on claim)':<60}{med(pooled):>10.3f}")
    print(f"{'hot      kvmc run --rm IMAGE true (pool warm --hot)':<60}{med(hot):>10.3f}")
    print(f"{'template kvmc run --rm IMAGE true':<60}{med(templated):>10.3f}")
    print(f"{'hot template clone kvmc run --rm IMAGE true':<60}{med(hot_clone):>10.3f}")
    print(f"{'cold     docker run --rm IMAGE true (through kvmc serve)':<60}{med(docker_cold):>10.3f}")
    print(f"{'auto     docker run --rm IMAGE true (serve, 2nd run onwards)':<60}{med(docker_auto):>10.3f}")
    print(f"{'cold     kvmc run IMAGE true (kept; baseline)':<60}{med(cold_kept):>10.3f}")
    print(f"{'hot      kvmc run IMAGE true (kept)':<60}{med(hot_kept):>10.3f}")
    print(f"{'pool warm-up, per member (2 in parallel)':<60}{warm_wall / n:>10.3f}")
    print(f"{'hot pool warm-up, per member (2 in parallel)':<60}{hot_warm_wall / n:>10.3f}")
    print(f"{'template warm-up (one template)':<60}{template_wall:>10.3f}")
    print(f"{'save file per member':<60}{(save_mib[0] if save_mib else float('nan')):>10.1f}")
    print(f"{'template device state file':<60}{template['save_mib']:>10.2f}")
    print(f"{'template RAM file in tmpfs (paid once per template)':<60}{ram_mib:>10.1f}")
    print(f"{'PSS per hot member waiting paused':<60}{pss_hot_waiting:>10.1f}")
    print(f"{'PSS per hot template clone waiting paused':<60}{pss_clone_waiting:>10.1f}")
    print(f"{'PSS per idle VM, cold boot':<60}{pss_cold:>10.1f}")
    print(f"{'PSS per idle VM, restored from the pool':<60}{pss_pool:>10.1f}")
    print(f"{'PSS per idle VM, template clone':<60}{pss_template:>10.1f}")
    print(f"{'ratio pooled/cold start-up, restore on claim':<60}{med(pooled) / med(cold):>10.2f}")
    print(f"{'ratio hot pooled/cold start-up (target <= 0.25)':<60}{med(hot) / med(cold):>10.2f}")
    print(f"{'ratio template/cold start-up':<60}{med(templated) / med(cold):>10.2f}")
    print(f"{'ratio hot template clone/cold start-up (target <= 0.25)':<60}{med(hot_clone) / med(cold):>10.2f}")
    print(f"{'ratio serve auto-pooled/cold start-up':<60}{med(docker_auto) / med(docker_cold):>10.2f}"
          f"{'target <= 0.15':>18}")
    print(f"{'ratio PSS hot template clone/hot member, waiting paused':<60}"
          f"{pss_clone_waiting / pss_hot_waiting:>10.2f}")
    print(f"{'ratio hot pooled/cold, kept containers (target <= 0.25)':<60}{med(hot_kept) / med(cold_kept):>10.2f}")
    print(f"{'ratio docker run via kvmc serve/kvmc run, cold start-up':<60}{med(docker_cold) / med(cold):>10.2f}")
    print(f"{'ratio PSS save-pool/cold':<60}{pss_pool / pss_cold:>10.2f}")
    print(f"{'ratio PSS template/save-pool':<60}{pss_template / pss_pool:>10.2f}")
    print(f"{'ratio PSS template/save-pool, + RAM file/N (upper bound)':<60}"
          f"{(pss_template + ram_mib / n) / pss_pool:>10.2f}")


if __name__ == "__main__":
    main()
