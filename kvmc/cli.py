"""The kvmc command line: parse flags, make one service call, print. No rules of its own.

Every rule (what may be removed, which states allow what) is in kvmc/service, shared with the
API server; this module only turns flags into service calls, results into text, and errors
into docker's exit codes: the container command's own code; 125 when kvmc itself fails
(including bad flags); 126 when the command cannot be invoked; 127 when it is not found.
"""

from __future__ import annotations

import copy
import functools
import inspect as pyinspect
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, NoReturn, Optional

import typer

from kvmc.config import Config, load_config
from kvmc.errors import KvmcError, UsageError
from kvmc.service.reports import for_each
from kvmc.process import ProcessOptions, parse_cpus, parse_memory

# Help texts are plain text: "[HOSTIP:]" and "[/tcp|udp]" are docker's syntax, not rich markup.
_PLAIN = {"rich_markup_mode": None, "no_args_is_help": True}
app = typer.Typer(
    help="Run OCI container images as lightweight microVMs: one VM per container, docker's workflow.",
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    **_PLAIN,
)
image_app = typer.Typer(help="Manage images in kvmc's local store.", **_PLAIN)
app.add_typer(image_app, name="image")
volume_app = typer.Typer(help="Named volumes: ext4 disks that outlive containers (-v NAME:/path).", **_PLAIN)
app.add_typer(volume_app, name="volume")
network_app = typer.Typer(help="Networks: containers on one reach each other by name (--network NAME).", **_PLAIN)
app.add_typer(network_app, name="network")
system_app = typer.Typer(help="Disk usage and clean-up of kvmc's store.", **_PLAIN)
app.add_typer(system_app, name="system")
pool_app = typer.Typer(help="Pools of pre-booted, saved VMs (or VM templates) that 'run' restores (or "
                       "clones) instead of booting.", **_PLAIN)
app.add_typer(pool_app, name="pool")
host_app = typer.Typer(help="Container hosts as cattle: disposable VMs running their own Docker Engine, reached "
                       "through a DOCKER_HOST socket.", **_PLAIN)
app.add_typer(host_app, name="host")

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                     signal.SIGWINCH)
"""docker's --sig-proxy (for a process without a TTY): what a user sends a foreground client,
WINCH included (docker forwards all but CHLD, PIPE and URG; these are the ones that matter)."""

_state: dict[str, object] = {}


def _config() -> Config:
    if "config" not in _state:
        _state["config"] = load_config()
    return _state["config"]  # type: ignore[return-value]


def _services():  # noqa: ANN202 - imported lazily: `kvmc --help` must not need libvirt
    if "services" not in _state:
        from kvmc.service import Services

        _state["services"] = Services.for_config(_config(), verbose=bool(_state.get("verbose")))
    return _state["services"]


@contextmanager
def _forward_signals(send: Callable[[int], None]) -> Iterator[None]:
    """While a process is attached, this terminal's signals go to it (docker's --sig-proxy)."""
    previous = {sig: signal.signal(sig, lambda signum, _frame: send(signum)) for sig in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stdio() -> tuple:
    # stdin unbuffered (a FileIO on fd 0): the relay reads it in a daemon thread, which may
    # still be blocked in read() when the CLI exits (detach, the process ended); a blocked
    # BufferedReader holds its lock then, and Python aborts at shutdown waiting for it.
    stdin = open(0, "rb", buffering=0, closefd=False)  # noqa: SIM115 - fd 0 stays open
    return stdin, sys.stdout.buffer, sys.stderr.buffer


def _console():  # noqa: ANN202 - kvmc.terminal.HostTerminal, the engine's Console for a TTY
    from kvmc.terminal import HostTerminal

    return HostTerminal()


def _check_terminal_flags(tty: bool, interactive: bool, detach_keys: Optional[str], sig_proxy: str) -> bool:
    """Validate -t/-i/--detach-keys/--sig-proxy as docker does; whether to proxy signals."""
    from kvmc.detach import parse_detach_keys
    from kvmc.terminal import is_terminal

    if detach_keys is not None:
        parse_detach_keys(detach_keys)
    if tty and interactive and not is_terminal(0):
        raise UsageError("the input device is not a TTY: -t with -i needs a terminal on stdin "
                         "(drop -t to pipe into the command)")
    value = sig_proxy.strip().lower()
    if value not in ("true", "false", "1", "0", "t", "f"):
        raise UsageError(f'invalid --sig-proxy "{sig_proxy}": use --sig-proxy=true or --sig-proxy=false')
    return value in ("true", "1", "t")


def _report_each(reports: list, exit_code: int | None = 1) -> None:
    """Print each item's ref (or its error); if any failed, exit with ``exit_code`` (None:
    the first failure's own code, 125 for kvmc's errors)."""
    failed = [r.error for r in reports if not r.ok]
    for report in reports:
        if report.ok:
            typer.echo(report.ref)
        else:
            typer.echo(f"kvmc: {report.error}", err=True)
    if failed:
        raise typer.Exit(failed[0].exit_code if exit_code is None else exit_code)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Say what kvmc decides (accelerator, timings).")) -> None:
    _state["verbose"] = verbose


def _run_options(
    image: str, command: Optional[List[str]], name: Optional[str], rm: bool, env: Optional[List[str]],
    env_file: Optional[List[Path]], workdir: Optional[str], user: Optional[str], entrypoint: Optional[str],
    memory: Optional[str], cpus: Optional[str], interactive: bool, detach: bool, hostname: Optional[str],
    accel: Optional[str], network: str, publish: Optional[List[str]], volume: Optional[List[str]],
    tmpfs: Optional[List[str]], read_only: bool, network_alias: Optional[List[str]] = None, tty: bool = False,
    stdin_once: bool = False, log_opt: Optional[List[str]] = None,
):  # noqa: ANN202
    from kvmc.logs import parse_log_opt_flags
    from kvmc.runtime import DockerFields, RunOptions

    args = list(command or [])
    if args and args[0] == "--":
        args = args[1:]
    return RunOptions(
        image=image, host_env=os.environ,
        process=ProcessOptions(
            command=args, entrypoint=entrypoint, env=list(env or []), env_files=list(env_file or []),
            workdir=workdir, user=user, hostname=hostname, interactive=interactive,
        ),
        name=name, auto_remove=rm, detach=detach,
        memory_mib=parse_memory(memory) if memory else None,
        cpus=parse_cpus(cpus) if cpus else None, accel=accel,
        network=network, network_aliases=list(network_alias or []), publish=list(publish or []),
        volumes=list(volume or []), tmpfs=list(tmpfs or []), read_only=read_only,
        log_opts=parse_log_opt_flags(log_opt),
        # docker's StdinOnce: stdin closes with the first attach (run -i in the foreground,
        # create -i); run -d -i keeps it open for every later attach.
        docker=DockerFields(tty=tty, console_size=_console().size() if tty else None, open_stdin=interactive,
                            stdin_once=stdin_once),
    )


_IMAGE = typer.Argument(..., help="Image name[:tag] or id from 'kvmc images'.")
_COMMAND = typer.Argument(None, help="Command and arguments (after the image, optionally after --).")
_NAME = typer.Option(None, "--name", help="Container name (default: generated).")
_RM = typer.Option(False, "--rm", help="Remove the container (VM, disk, logs) when it exits.")
_ENV = typer.Option(None, "-e", "--env", help="Set NAME=VALUE (or pass NAME from the host).")
_ENV_FILE = typer.Option(None, "--env-file", help="Read NAME=VALUE lines from a file.")
_WORKDIR = typer.Option(None, "-w", "--workdir", help="Working directory inside the container.")
_USER = typer.Option(None, "-u", "--user", help="user, uid, user:group or uid:gid.")
_ENTRYPOINT = typer.Option(None, "--entrypoint", help="Override the image's entrypoint.")
_MEMORY = typer.Option(None, "-m", "--memory", help="VM memory, e.g. 256m or 1g (default from config: 256m).")
_CPUS = typer.Option(None, "--cpus", help="Number of vCPUs (fractions round up; default 1).")
_INTERACTIVE = typer.Option(False, "-i", "--interactive", help="Keep stdin open and forward it to the command.")
_TTY = typer.Option(False, "-t", "--tty", help="Allocate a pseudo-terminal in the guest (one output stream); "
                    "with -i, this terminal is raw while attached.")
_DETACH_KEYS = typer.Option(None, "--detach-keys", help="Keys that detach from a TTY and leave the container "
                            "running (default ctrl-p,ctrl-q; e.g. ctrl-a,x).")
_SIG_PROXY = typer.Option("true", "--sig-proxy", metavar="BOOL",
                          help="Forward the signals kvmc receives to the process (non-TTY only), as "
                          "--sig-proxy=true (default) or --sig-proxy=false.")
_HOSTNAME = typer.Option(None, "--hostname", help="Container host name (default: short id).")
_ACCEL = typer.Option(None, "--accel", help="auto (probe, default), kvm or tcg.")
_NETWORK = typer.Option("user", "--network", help="user (default, docker's bridge: NAT through QEMU's user-mode "
                        "network, host reachable as 10.0.2.2), none (loopback only), or a network from 'kvmc network "
                        "create': containers on it reach each other by name, and keep the user-mode network.")
_NETWORK_ALIAS = typer.Option(None, "--network-alias", help="One more name for the container on its --network "
                              "(repeatable).")
_PUBLISH = typer.Option(None, "-p", "--publish", help="Publish a port: [HOSTIP:][HOSTPORT:]PORT[/tcp|udp]; "
                        "HOSTIP defaults to 0.0.0.0, a missing HOSTPORT picks a free one.")
_VOLUME = typer.Option(None, "-v", "--volume", help="NAME:/path (named volume, created if missing) or "
                       "/host/dir:/path (virtiofs; never pooled), then :ro or :rw.")
_TMPFS = typer.Option(None, "--tmpfs", help="Mount a tmpfs: /path[:size=64m,mode=1777,...].")
_READ_ONLY = typer.Option(False, "--read-only", help="Mount the root filesystem read-only (volumes and "
                          "tmpfs stay writable).")
_LOG_OPT = typer.Option(None, "--log-opt", help="Log option KEY=VALUE, repeatable: max-size=10m (per file; -1: "
                        "no cap) and max-file=3 (files kept). Default: log_max_size/log_max_file of the "
                        "config, 20m and 5.")


# ------------------------------------------------- docker's container options (issue 16)
@dataclass
class ContainerFlags:
    """The run/create flags beyond the process: kvmc/options.py parses them for both doors."""

    label: Optional[List[str]] = None
    label_file: Optional[List[Path]] = None
    restart: str = "no"
    health_cmd: Optional[str] = None
    health_interval: Optional[str] = None
    health_timeout: Optional[str] = None
    health_retries: Optional[int] = None
    health_start_period: Optional[str] = None
    health_start_interval: Optional[str] = None
    no_healthcheck: bool = False
    init: bool = False
    add_host: Optional[List[str]] = None
    dns: Optional[List[str]] = None
    dns_search: Optional[List[str]] = None
    dns_option: Optional[List[str]] = None
    ulimit: Optional[List[str]] = None
    stop_signal: Optional[str] = None
    stop_timeout: Optional[int] = None
    publish_all: bool = False
    expose: Optional[List[str]] = None
    mount: Optional[List[str]] = None
    shm_size: Optional[str] = None
    privileged: bool = False
    cap_add: Optional[List[str]] = None
    cap_drop: Optional[List[str]] = None
    pull: str = "missing"
    platform: Optional[str] = None
    cidfile: Optional[Path] = None


_CONTAINER_FLAGS: list[tuple[str, Any, Any]] = [
    ("label", Optional[List[str]], typer.Option(None, "-l", "--label", help="Set a label KEY=VALUE (repeatable).")),
    ("label_file", Optional[List[Path]], typer.Option(None, "--label-file", help="Read KEY=VALUE labels from a file.")),
    ("restart", str, typer.Option("no", "--restart", help="Restart policy: no, on-failure[:N], always or "
                                  "unless-stopped. The container's monitor boots it again after its process "
                                  "exits, with docker's back-off; always and unless-stopped ones also come back "
                                  "when 'kvmc serve' (or 'kvmc system boot') starts.")),
    ("health_cmd", Optional[str], typer.Option(None, "--health-cmd", help="Command to run to check health "
                                               "(with /bin/sh -c, as an exec in the container).")),
    ("health_interval", Optional[str], typer.Option(None, "--health-interval", help="Time between checks (30s).")),
    ("health_timeout", Optional[str], typer.Option(None, "--health-timeout", help="Longest a check may run (30s).")),
    ("health_retries", Optional[int], typer.Option(None, "--health-retries", help="Failures in a row to be "
                                                   "unhealthy (3).")),
    ("health_start_period", Optional[str], typer.Option(None, "--health-start-period", help="Time to start "
                                                        "before failures count (0s).")),
    ("health_start_interval", Optional[str], typer.Option(None, "--health-start-interval", help="Time between "
                                                          "checks during the start period (5s).")),
    ("no_healthcheck", bool, typer.Option(False, "--no-healthcheck", help="Disable any health check, the "
                                          "image's too.")),
    ("init", bool, typer.Option(False, "--init", help="Accepted: kvmc's agent is already PID 1 of the VM and "
                                "reaps every zombie.")),
    ("add_host", Optional[List[str]], typer.Option(None, "--add-host", help="Add NAME:IP to /etc/hosts "
                                                   "(IP may be host-gateway: the host, 10.0.2.2).")),
    ("dns", Optional[List[str]], typer.Option(None, "--dns", help="Nameserver for /etc/resolv.conf.")),
    ("dns_search", Optional[List[str]], typer.Option(None, "--dns-search", help="Search domain for resolv.conf.")),
    ("dns_option", Optional[List[str]], typer.Option(None, "--dns-option", help="Resolver option for resolv.conf.")),
    ("ulimit", Optional[List[str]], typer.Option(None, "--ulimit", help="NAME=SOFT[:HARD], e.g. nofile=1024:2048.")),
    ("stop_signal", Optional[str], typer.Option(None, "--stop-signal", help="Signal that stops the container "
                                                "(default: the image's STOPSIGNAL, else SIGTERM).")),
    ("stop_timeout", Optional[int], typer.Option(None, "--stop-timeout", help="Seconds to wait before killing "
                                                 "it on stop (-1: wait).")),
    ("publish_all", bool, typer.Option(False, "-P", "--publish-all", help="Publish every exposed port on a "
                                       "free host port.")),
    ("expose", Optional[List[str]], typer.Option(None, "--expose", help="Expose PORT[/proto] (published by -P).")),
    ("mount", Optional[List[str]], typer.Option(None, "--mount", help="type=volume|bind|tmpfs,source=...,"
                                                "target=...[,readonly][,tmpfs-size=...]")),
    ("shm_size", Optional[str], typer.Option(None, "--shm-size", help="Size of /dev/shm, e.g. 64m.")),
    ("privileged", bool, typer.Option(False, "--privileged", help="Accepted: a container's processes have every "
                                      "capability inside their own VM (makes --cap-drop a no-op).")),
    ("cap_add", Optional[List[str]], typer.Option(None, "--cap-add", help="Accepted: nothing is missing to add "
                                                  "(undoes a --cap-drop).")),
    ("cap_drop", Optional[List[str]], typer.Option(None, "--cap-drop", help="Drop a capability (or ALL) from "
                                                   "every process of the container.")),
    ("pull", str, typer.Option("missing", "--pull", help="missing (pull an image that is not here), always "
                               "or never.")),
    ("platform", Optional[str], typer.Option(None, "--platform", help="Only linux/amd64, the host's "
                                             "architecture.")),
    ("cidfile", Optional[Path], typer.Option(None, "--cidfile", help="Write the container id to this file.")),
]


def _with_container_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command (run, create) the container flags as one ``flags: ContainerFlags``."""
    names = [name for name, _, _ in _CONTAINER_FLAGS]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        flags = ContainerFlags(**{name: kwargs.pop(name) for name in names})
        return command(**kwargs, flags=flags)

    signature = pyinspect.signature(command, eval_str=True)
    params = [p for p in signature.parameters.values() if p.name != "flags"]
    params += [pyinspect.Parameter(name, pyinspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
               for name, annotation, option in _CONTAINER_FLAGS]
    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # typer must read __signature__, not the wrapped function's
    return wrapper


def _read_labels(files: list[Path]) -> dict[str, str]:
    """docker's --label-file: KEY=VALUE lines, # comments and blank lines skipped."""
    labels: dict[str, str] = {}
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read label file {path}: {exc.strerror}") from exc
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.strip().partition("=")
                labels[key] = value
    return labels


def _apply_container_flags(opts, flags: ContainerFlags):  # noqa: ANN001, ANN202 - RunOptions
    """Put the flags into RunOptions, parsed by kvmc/options.py (what the API's JSON becomes too)."""
    from kvmc.health import Healthcheck
    from kvmc.options import ContainerOptions, RestartPolicy, Ulimit, parse_bytes, parse_duration, parse_mount

    labels = _read_labels(list(flags.label_file or []))
    for item in flags.label or []:
        key, _, value = item.partition("=")
        labels[key] = value
    check = None
    if flags.no_healthcheck:
        if flags.health_cmd:
            raise UsageError("--no-healthcheck conflicts with --health-* options")
        check = Healthcheck(test=["NONE"])
    elif any(v is not None for v in (flags.health_cmd, flags.health_interval, flags.health_timeout,
                                     flags.health_retries, flags.health_start_period, flags.health_start_interval)):
        check = Healthcheck(
            test=["CMD-SHELL", flags.health_cmd] if flags.health_cmd else [],
            interval_s=parse_duration(flags.health_interval or "0", "--health-interval"),
            timeout_s=parse_duration(flags.health_timeout or "0", "--health-timeout"),
            start_period_s=parse_duration(flags.health_start_period or "0", "--health-start-period"),
            start_interval_s=parse_duration(flags.health_start_interval or "0", "--health-start-interval"),
            retries=flags.health_retries or 0)
    for spec in flags.mount or []:
        mount = parse_mount(spec)
        if mount.volume:
            opts.volumes.append(mount.volume)
        elif mount.tmpfs:
            opts.tmpfs.append(mount.tmpfs)
        # an anonymous volume: the path stays part of the container's disk (docs/api.md)
    opts.options = ContainerOptions(
        restart=RestartPolicy.parse(flags.restart), healthcheck=check, init=True if flags.init else None,
        dns=list(flags.dns or []), dns_search=list(flags.dns_search or []), dns_options=list(flags.dns_option or []),
        extra_hosts=list(flags.add_host or []), ulimits=[Ulimit.parse(u) for u in flags.ulimit or []],
        cap_add=list(flags.cap_add or []), cap_drop=list(flags.cap_drop or []), privileged=flags.privileged,
        shm_size=parse_bytes(flags.shm_size, "--shm-size") if flags.shm_size else None,
        expose=[e if "/" in e else f"{e}/tcp" for e in flags.expose or []], publish_all=flags.publish_all)
    opts.publish_all = flags.publish_all
    opts.docker.labels = labels
    opts.docker.stop_signal = flags.stop_signal
    opts.docker.stop_timeout = flags.stop_timeout
    opts.pull = flags.pull
    opts.platform = flags.platform
    if flags.cidfile is not None and flags.cidfile.exists():
        raise UsageError(f"container ID file found, make sure the other container isn't running or delete "
                         f"{flags.cidfile}")
    return opts


def _cidfile_writer(path: Optional[Path]) -> Optional[Callable[[Any], None]]:
    if path is None:
        return None

    def write(record: Any) -> None:
        try:
            with open(path, "x") as f:
                f.write(record.id)
        except OSError as exc:
            raise UsageError(f"cannot write the container ID file {path}: {exc.strerror}") from exc

    return write


@app.command(context_settings={"allow_interspersed_args": False})
@_with_container_flags
def run(
    image: str = _IMAGE, command: Optional[List[str]] = _COMMAND, name: Optional[str] = _NAME,
    rm: bool = _RM, env: Optional[List[str]] = _ENV, env_file: Optional[List[Path]] = _ENV_FILE,
    workdir: Optional[str] = _WORKDIR, user: Optional[str] = _USER, entrypoint: Optional[str] = _ENTRYPOINT,
    memory: Optional[str] = _MEMORY, cpus: Optional[str] = _CPUS, interactive: bool = _INTERACTIVE,
    detach: bool = typer.Option(False, "-d", "--detach", help="Run in the background and print the container id."),
    hostname: Optional[str] = _HOSTNAME, accel: Optional[str] = _ACCEL,
    no_pool: bool = typer.Option(False, "--no-pool", help="Boot a fresh VM even if a pooled one is ready."),
    network: str = _NETWORK, publish: Optional[List[str]] = _PUBLISH, volume: Optional[List[str]] = _VOLUME,
    tmpfs: Optional[List[str]] = _TMPFS, read_only: bool = _READ_ONLY, network_alias: Optional[List[str]] = _NETWORK_ALIAS,
    tty: bool = _TTY, detach_keys: Optional[str] = _DETACH_KEYS, sig_proxy: str = _SIG_PROXY,
    log_opt: Optional[List[str]] = _LOG_OPT, flags: ContainerFlags = ContainerFlags(),
) -> None:
    """Run a command in a new container: boot a microVM whose root filesystem is the image.

    A ready pool template of the same image and size (kvmc pool warm --template) is cloned, or
    else a ready pool member restored, instead of booting; -v says which happened, and so does
    'kvmc inspect' (boot: template, pool or cold).
    """
    proxy = _check_terminal_flags(tty, interactive and not detach, detach_keys, sig_proxy)
    opts = _run_options(image, command, name, rm, env, env_file, workdir, user, entrypoint, memory, cpus,
                        interactive, detach, hostname, accel, network, publish, volume, tmpfs, read_only,
                        network_alias, tty, stdin_once=interactive and not detach, log_opt=log_opt)
    opts.use_pool = not no_pool
    _apply_container_flags(opts, flags)
    record, code = _services().containers.run(opts, *_stdio(), signals=_forward_signals if proxy else None,
                                              console=_console() if tty else None, detach_keys=detach_keys,
                                              created=_cidfile_writer(flags.cidfile))
    if detach:
        typer.echo(record.id)
    raise typer.Exit(code or 0)  # None: detached from the TTY (detach keys), the container runs on


@app.command(context_settings={"allow_interspersed_args": False})
@_with_container_flags
def create(
    image: str = _IMAGE, command: Optional[List[str]] = _COMMAND, name: Optional[str] = _NAME,
    env: Optional[List[str]] = _ENV, env_file: Optional[List[Path]] = _ENV_FILE,
    workdir: Optional[str] = _WORKDIR, user: Optional[str] = _USER, entrypoint: Optional[str] = _ENTRYPOINT,
    memory: Optional[str] = _MEMORY, cpus: Optional[str] = _CPUS, interactive: bool = _INTERACTIVE,
    hostname: Optional[str] = _HOSTNAME, accel: Optional[str] = _ACCEL,
    network: str = _NETWORK, publish: Optional[List[str]] = _PUBLISH, volume: Optional[List[str]] = _VOLUME,
    tmpfs: Optional[List[str]] = _TMPFS, read_only: bool = _READ_ONLY, network_alias: Optional[List[str]] = _NETWORK_ALIAS,
    tty: bool = _TTY, log_opt: Optional[List[str]] = _LOG_OPT, flags: ContainerFlags = ContainerFlags(),
) -> None:
    """Create a container (record, disk, defined VM) without starting it; print its id."""
    opts = _run_options(image, command, name, False, env, env_file, workdir, user, entrypoint, memory, cpus,
                        interactive, True, hostname, accel, network, publish, volume, tmpfs, read_only, network_alias,
                        tty, stdin_once=interactive, log_opt=log_opt)
    _apply_container_flags(opts, flags)
    record = _services().containers.create(opts)
    writer = _cidfile_writer(flags.cidfile)
    if writer is not None:
        writer(record)
    typer.echo(record.id)


@app.command()
def start(
    containers: List[str] = typer.Argument(..., help="Container names or id prefixes."),
    attach_: bool = typer.Option(False, "-a", "--attach", help="Attach to the output and wait for the exit."),
    interactive: bool = typer.Option(False, "-i", "--interactive", help="Attach stdin too (with -a)."),
    detach_keys: Optional[str] = _DETACH_KEYS,
) -> None:
    """Start created or stopped containers (their disks keep what they wrote)."""
    service = _services().containers
    if attach_ or interactive:
        if len(containers) > 1:
            raise UsageError("you cannot start and attach multiple containers at once")
        record = service.get(containers[0])
        _check_terminal_flags(record.tty, interactive, detach_keys, "true")
        stdin, stdout, stderr = _stdio()
        code = service.start_attached(containers[0], stdin if interactive else None, stdout, stderr,
                                      signals=_forward_signals, console=_console(), detach_keys=detach_keys)
        raise typer.Exit(code or 0)
    _report_each(for_each(containers, service.start), exit_code=None)


@app.command()
def stop(
    containers: List[str] = typer.Argument(..., help="Container names or id prefixes."),
    time_: Optional[int] = typer.Option(None, "-t", "--time", help="Seconds to wait after SIGTERM before SIGKILL (default 10)."),
    signal_: Optional[str] = typer.Option(None, "-s", "--signal", help="Signal to send instead of the container's "
                                          "stop signal (SIGTERM unless --stop-signal or the image says otherwise)."),
) -> None:
    """Stop running containers: the stop signal, SIGKILL after the timeout, then the VM powers off.
    A stopped container is not restarted by its restart policy (until it is started again)."""
    service = _services().containers
    _report_each(for_each(containers, lambda ref: service.stop(ref, time_, signal_)), exit_code=None)


@app.command()
def restart(
    containers: List[str] = typer.Argument(..., help="Container names or id prefixes."),
    time_: Optional[int] = typer.Option(None, "-t", "--time", help="Seconds to wait before killing it."),
) -> None:
    """Stop then start containers."""
    service = _services().containers
    _report_each(for_each(containers, lambda ref: service.restart(ref, time_)), exit_code=None)


@app.command()
def kill(
    containers: List[str] = typer.Argument(..., help="Container names or id prefixes."),
    signal_: str = typer.Option("KILL", "-s", "--signal", help="Signal name or number (default KILL)."),
) -> None:
    """Send a signal to containers' main processes."""
    from kvmc.service.containers import parse_signal

    signum = parse_signal(signal_)
    service = _services().containers
    _report_each(for_each(containers, lambda ref: service.kill(ref, signum)), exit_code=None)


@app.command()
def wait(containers: List[str] = typer.Argument(..., help="Container names or id prefixes.")) -> None:
    """Block until containers stop, then print their exit codes."""
    service = _services().containers
    for ref in containers:
        typer.echo(service.wait(ref))


@app.command(name="exec", context_settings={"allow_interspersed_args": False})
def exec_(
    container: str = typer.Argument(..., help="Container name or id prefix."),
    command: List[str] = typer.Argument(..., help="Command and arguments."),
    interactive: bool = _INTERACTIVE, env: Optional[List[str]] = _ENV,
    workdir: Optional[str] = _WORKDIR, user: Optional[str] = _USER, tty: bool = _TTY,
    detach_keys: Optional[str] = _DETACH_KEYS,
    detach: bool = typer.Option(False, "-d", "--detach", help="Leave the process running in the background."),
    privileged: bool = typer.Option(False, "--privileged", help="Every capability, whatever the container's "
                                    "--cap-drop."),
) -> None:
    """Run a second process in a running container, with its own output and exit code."""
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if detach and interactive:
        raise UsageError("-d and -i cannot be combined: a detached process has no stdin")
    _check_terminal_flags(tty, interactive, detach_keys, "true")
    opts = ProcessOptions(command=args, env=list(env or []), workdir=workdir, user=user, interactive=interactive,
                          tty=tty)
    code = _services().containers.exec(container, opts, *_stdio(), signals=_forward_signals, host_env=os.environ,
                                       console=_console() if tty and not detach else None, detach_keys=detach_keys,
                                       privileged=privileged, detach=detach)
    raise typer.Exit(code or 0)  # None: detached from the TTY, the process runs on


@app.command()
def attach(
    container: str = typer.Argument(..., help="Container name or id prefix."),
    no_stdin: bool = typer.Option(False, "--no-stdin", help="Do not attach stdin."),
    detach_keys: Optional[str] = _DETACH_KEYS, sig_proxy: str = _SIG_PROXY,
) -> None:
    """Attach to a running container's output (and stdin, if it was started with -i) until it
    exits; from a TTY, the detach keys (ctrl-p ctrl-q) leave it running."""
    service = _services().containers
    record = service.get(container)
    proxy = _check_terminal_flags(False, False, detach_keys, sig_proxy)
    stdin, stdout, stderr = _stdio()
    code = service.attach(container, None if no_stdin else stdin, stdout, stderr,
                          signals=_forward_signals if proxy else None, console=_console() if record.tty else None,
                          detach_keys=detach_keys)
    raise typer.Exit(code or 0)  # None: detached, the container runs on


@app.command("ps")
def ps(
    all_: bool = typer.Option(False, "-a", "--all", help="Show all containers (default: running only)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only show ids."),
    format_: Optional[str] = typer.Option(None, "--format", help="docker's format: a Go template ({{.ID}}, "
                                          "{{.Names}}, {{.Status}}, {{.Label \"k\"}}, {{json .}}, table ...) or json."),
    filter_: Optional[List[str]] = typer.Option(
        None, "--filter", "-f", help="KEY=VALUE, repeatable: label, name, id, status, ancestor, exited, volume, "
        "network, health (as docker's)."),
    last: Optional[int] = typer.Option(None, "-n", "--last", help="Show the N last created containers (all states)."),
    latest: bool = typer.Option(False, "-l", "--latest", help="Show the last created container (all states)."),
    size: bool = typer.Option(False, "-s", "--size", help="Show what each container wrote (and with its image)."),
    no_trunc: bool = typer.Option(False, "--no-trunc", help="Do not truncate ids and commands."),
) -> None:
    """List containers."""
    import time

    from kvmc.formatting import PS_HEADERS, PS_TABLE, PS_TABLE_SIZE, ContainerRow, render_rows
    from kvmc.service.filters import parse_filter_flags
    from kvmc.service.containers import PAUSE_REASONS
    from kvmc.views import container_summary

    service = _services().containers
    limit = 1 if latest else last if last is not None and last > 0 else None
    records = service.list(all_ or limit is not None, parse_filter_flags(list(filter_ or [])))
    if limit is not None:
        records = records[:limit]
    if quiet:
        for r in records:
            typer.echo(r.id if no_trunc else r.short_id)
        return
    now = time.time()
    vms = service.vm_states(records)  # a VM paused by QEMU on a full disk says so: "Paused (disk full)"
    rows = [ContainerRow(container_summary(r, now=now, vm_state=vms.get(r.id, (None, None))[0],
                                           pause_reason=PAUSE_REASONS.get(vms.get(r.id, (None, None))[1] or "")),
                         trunc=not no_trunc, now=now, size=service.size(r) if size else None) for r in records]
    table = PS_TABLE_SIZE if size else PS_TABLE
    for line in render_rows(format_, rows, table, PS_HEADERS):
        typer.echo(line)


@app.command()
def stats(
    containers: Optional[List[str]] = typer.Argument(
        None, help="Container names or id prefixes (default: every running container)."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Print one table and exit (default: a new one "
                                   "every second until interrupted)."),
    format_: Optional[str] = typer.Option(None, "--format", help="docker's format: a Go template ({{.Name}}, "
                                          "{{.CPUPerc}}, {{.MemUsage}}, {{.NetIO}}, {{.BlockIO}}, table ...) or json."),
    no_trunc: bool = typer.Option(False, "--no-trunc", help="Do not truncate ids."),
) -> None:
    """Show containers' CPU, memory, network and disk use, as docker stats does.

    The figures are the VM's: CPU is its vCPUs' time (100% is one host core), memory is QEMU's
    resident memory against the guest's size, NET I/O counts the NICs on kvmc networks (the
    default user-mode NIC has no host device to count on), BLOCK I/O the guest's disk reads and
    writes. The same JSON as the API's /containers/{id}/stats."""
    import time

    from kvmc.errors import ContainerNotRunning
    from kvmc.formatting import STATS_HEADERS, STATS_TABLE, StatsRow, render_rows
    from kvmc.views import container_stats

    service = _services().containers

    def sample_all() -> dict[str, tuple[str, Any, dict, float]]:
        """(ref, record, sample, read at) by container id."""
        refs = list(containers) if containers else [r.id for r in service.list(False, {})]
        samples = {}
        for ref in refs:
            try:
                record, sample = service.stats(ref)
            except ContainerNotRunning:
                if containers:
                    raise
                continue  # it ended since the listing
            samples[record.id] = (ref, record, sample, time.time())
        return samples

    previous = sample_all()
    clear = not no_stream and sys.stdout.isatty()
    while True:
        time.sleep(0.5 if no_stream else 1.0)  # CPU % is the use between two samples
        current = sample_all()
        rows = []
        for ident, (ref, record, sample, read_at) in current.items():
            before, before_at = previous[ident][2:] if ident in previous else (None, None)
            rows.append(StatsRow(container_stats(record, sample, before, read_at, before_at),
                                 container=ref if containers else "", trunc=not no_trunc))
        if clear:
            typer.echo("\033[2J\033[H", nl=False)
        for line in render_rows(format_, rows, STATS_TABLE, STATS_HEADERS):
            typer.echo(line)
        if no_stream:
            return
        previous = current


@app.command()
def pause(containers: List[str] = typer.Argument(..., help="Container names or id prefixes.")) -> None:
    """Pause containers: their VMs stop running (libvirt suspends them) and keep their memory."""
    service = _services().containers
    _report_each(for_each(containers, service.pause))


@app.command()
def unpause(containers: List[str] = typer.Argument(..., help="Container names or id prefixes.")) -> None:
    """Resume paused containers' VMs where they stopped."""
    service = _services().containers
    _report_each(for_each(containers, service.unpause))


@app.command(context_settings={"allow_interspersed_args": False})
def top(
    container: str = typer.Argument(..., help="Container name or id prefix."),
    ps_args: Optional[List[str]] = typer.Argument(None, help="Options for the image's ps (as docker top's)."),
) -> None:
    """List a container's processes: the image's own ps, run in the guest (not the VM's kernel threads)."""
    from kvmc.gotemplate import align

    titles, processes = _services().containers.top(container, list(ps_args or []))
    for line in align(["\t".join(titles), *("\t".join(row) for row in processes)]):
        typer.echo(line)


@app.command()
def rm(
    containers: List[str] = typer.Argument(..., help="Container names or id prefixes."),
    force: bool = typer.Option(False, "-f", "--force", help="Kill a running container first."),
    volumes: bool = typer.Option(False, "-v", "--volumes", help="Accepted: docker removes anonymous volumes, "
                                 "which kvmc does not make; named volumes are kept, as in docker."),
) -> None:
    """Remove containers: their VM, disk, sockets and logs."""
    service = _services().containers
    _report_each(for_each(containers, lambda ref: service.remove(ref, force=force)))


@app.command()
def inspect(
    names: List[str] = typer.Argument(..., help="Container (or image) names or ids."),
    format_: Optional[str] = typer.Option(None, "-f", "--format", help="A Go template ({{.State.Status}}, "
                                          "{{json .Config.Labels}}, ...) or json."),
    type_: Optional[str] = typer.Option(None, "--type", help="container or image (default: a container, else "
                                        "an image)."),
    size: bool = typer.Option(False, "-s", "--size", help="Add SizeRw and SizeRootFs to containers."),
) -> None:
    """Show containers (or images) as docker's inspect JSON; kvmc's own facts are under Kvmc."""
    from kvmc.errors import AmbiguousContainer, ContainerNotFound
    from kvmc.gotemplate import parse
    from kvmc.views import image_inspect

    if type_ not in (None, "container", "image"):
        raise UsageError(f'"{type_}" is not a valid value for --type: use container or image')
    services = _services()
    found = []
    for name in names:
        obj = None
        ambiguous: AmbiguousContainer | None = None
        if type_ in (None, "container"):
            try:
                record = services.containers.get(name)
                obj = services.containers.inspect_record(record)
                if size:
                    obj["SizeRw"], obj["SizeRootFs"] = services.containers.size(record)
            except AmbiguousContainer as exc:
                if type_ == "container":
                    raise
                ambiguous = exc
            except ContainerNotFound:
                if type_ == "container":
                    raise
        if obj is None:
            try:
                obj = image_inspect(services.images.get(name))
            except KvmcError:
                if type_ == "image":
                    raise
                if ambiguous is not None:
                    raise ambiguous from None
                raise ContainerNotFound(f"no such container or image: {name}") from None
        found.append(obj)
    if format_ is None:
        typer.echo(json.dumps(found, indent=4))
        return
    template = parse("{{json .}}" if format_ == "json" else format_.replace("\\t", "\t").replace("\\n", "\n"))
    for obj in found:
        typer.echo(template.render(obj))


@app.command()
def logs(
    container: str = typer.Argument(..., help="Container name or id prefix."),
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new output until the container exits."),
    tail: str = typer.Option("all", "-n", "--tail", help="Only the last N lines of output (default: all)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only output from this time on: a duration "
                                        "before now (10m, 1h30m), an RFC 3339 time or a Unix timestamp."),
    until: Optional[str] = typer.Option(None, "--until", help="Only output up to this time (same forms)."),
    timestamps: bool = typer.Option(False, "-t", "--timestamps", help="Prefix each line with its time."),
) -> None:
    """Print a container's output (kept in its log, whether it ran attached or detached)."""
    if tail != "all" and not tail.lstrip("-").isdigit():
        raise UsageError(f'invalid --tail "{tail}": a number of lines or "all"')
    lines = None if tail == "all" else int(tail)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    for entry in _services().containers.logs(container, tail=lines, follow=follow, since=since, until=until):
        stream = out if entry.stream == "stdout" else err
        stream.write(f"{entry.time} ".encode() + entry.data if timestamps else entry.data)
        stream.flush()


@app.command()
def images(
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only show ids."),
    all_: bool = typer.Option(False, "-a", "--all", help="Show all images (kvmc has no intermediate images: "
                              "the same list)."),
    filter_: Optional[List[str]] = typer.Option(None, "--filter", "-f", help="dangling=true|false, "
                                                "reference=PATTERN, label=KEY[=VALUE]."),
    format_: Optional[str] = typer.Option(None, "--format", help="A Go template ({{.Repository}}, {{.Tag}}, "
                                          "{{.ID}}, {{.Size}}, ...), table ... or json."),
    no_trunc: bool = typer.Option(False, "--no-trunc", help="Full image ids."),
    digests: bool = typer.Option(False, "--digests", help="Show digests."),
) -> None:
    """List images in the local store."""
    import time

    from kvmc.formatting import IMAGES_HEADERS, IMAGES_TABLE, IMAGES_TABLE_DIGESTS, ImageRow, image_filter, render_rows
    from kvmc.service.filters import parse_filter_flags
    from kvmc.views import image_summary

    services = _services()
    filters = parse_filter_flags(list(filter_ or []))
    now = time.time()
    used: dict[str, int] = {}
    for record in services.containers.list(all_=True):
        used[record.image_id] = used.get(record.image_id, 0) + 1
    rows = []
    for img in services.images.list():
        summary = image_summary(img)
        for tag in image_filter(summary, list(img.tags), filters):
            rows.append(ImageRow(summary, tag, trunc=not no_trunc, now=now, containers=used.get(img.id, 0)))
    if quiet:
        for ident in dict.fromkeys(row.ID for row in rows):
            typer.echo(ident)
        return
    for line in render_rows(format_, rows, IMAGES_TABLE_DIGESTS if digests else IMAGES_TABLE, IMAGES_HEADERS):
        typer.echo(line)


@app.command()
def pull(ref: str = typer.Argument(..., help="Registry reference, e.g. alpine or quay.io/x/y:tag.")) -> None:
    """Pull an image from a registry with skopeo (needs network access to the registry)."""
    img = _services().images.pull(ref)
    typer.echo(f"{img.tags[0] if img.tags else ref}: {img.id}")


@app.command()
def rmi(
    refs: List[str] = typer.Argument(..., help="Image names or ids."),
    force: bool = typer.Option(False, "-f", "--force", help="Remove an id with several tags."),
) -> None:
    """Remove images (untag; delete the disk when no tag remains)."""
    service = _services().images
    for report in for_each(refs, lambda ref: service.remove(ref, force=force)):
        if not report.ok:
            raise report.error
        for tag in report.result.untagged:
            typer.echo(f"Untagged: {tag}")
        if report.result.deleted:
            typer.echo(f"Deleted: sha256:{report.result.deleted}")


@image_app.command("import")
def image_import(
    path: Path = typer.Argument(..., help="OCI image layout directory or 'docker save' tarball."),
    name: Optional[str] = typer.Option(None, "--name", "-t", help="name:tag for the image."),
) -> None:
    """Import an image from an OCI layout directory or a docker-save tarball."""
    img = _services().images.import_path(path, name)
    typer.echo(f"{', '.join(img.tags)}: {img.id}")


@image_app.command("build-default")
def image_build_default(name: str = typer.Option("kvmc/busybox:latest", "--name", "-t", help="name:tag.")) -> None:
    """Build kvmc's default image locally from the host's busybox-static (no registry needed)."""
    img = _services().images.build_default(name)
    typer.echo(f"{name}: {img.id}")


@image_app.command("build-ci-helper")
def image_build_ci_helper(
    name: str = typer.Option("kvmc/ci-helper:latest", "--name", "-t", help="name:tag."),
) -> None:
    """Build the helper image of gitlab-ci-local's docker executor: busybox with bash and rsync
    (ci/gitlab-local.sh uses it; no registry needed)."""
    img = _services().images.build_ci_helper(name)
    typer.echo(f"{name}: {img.id}")


@image_app.command("ls")
def image_ls(quiet: bool = typer.Option(False, "-q", "--quiet"),
             format_: Optional[str] = typer.Option(None, "--format", help="As 'kvmc images --format'.")) -> None:
    """List images (same as 'kvmc images')."""
    images(quiet=quiet, all_=False, filter_=None, format_=format_, no_trunc=False, digests=False)


@image_app.command("rm")
def image_rm(refs: List[str] = typer.Argument(...), force: bool = typer.Option(False, "-f", "--force")) -> None:
    """Remove images (same as 'kvmc rmi')."""
    rmi(refs, force)


@pool_app.command("warm")
def pool_warm(
    image: str = typer.Argument(..., help="Image name[:tag] or id."),
    size: Optional[int] = typer.Option(None, "--size", "-n",
                                       help="How many ready members to keep for this image and size (default 2)."),
    memory: Optional[str] = _MEMORY, cpus: Optional[str] = _CPUS, accel: Optional[str] = _ACCEL,
    network: str = typer.Option("user", "--network", help="user or none: members serve runs with this network."),
    template: bool = typer.Option(False, "--template", help="Make one VM template instead of saved members: "
                                  "its RAM in a file on tmpfs that every run maps copy-on-write (with --hot: "
                                  "and --size clones of it, started ahead and waiting paused)."),
    hot: bool = typer.Option(False, "--hot", help="Also keep the members restored and paused, so a run "
                             "resumes one instead of restoring it: faster, but each holds its RAM meanwhile."),
) -> None:
    """Boot VMs of IMAGE to the point where the agent waits, save them, and keep them ready.

    With --hot: members are restored from their save files ahead of time and wait paused
    (existing members of this image and size are made hot too). With --template: one template
    VM for this image and size (made if there is none), whose captured RAM and device state
    serve any number of runs (clones); with --template --hot, also --size hot template clones
    (default 2): clones started ahead of time and left paused, so a run resumes one (the hot
    pool's speed) and shares the template's RAM pages.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    service = _services().pools
    memory_mib = parse_memory(memory) if memory else None
    cpu_count = parse_cpus(cpus) if cpus else None
    if template:
        made, new, clones = service.warm_template(image, memory_mib, cpu_count, accel, network, size, hot)
        typer.echo(f"template {made.id[:12]} {'made' if new else 'already ready'} for {image} "
                   f"(RAM file {made.mem_path})" + (f"; {len(clones)} hot clone(s) made" if hot else ""))
        return
    with Progress(TextColumn("warming {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as progress:
        task = progress.add_task(image, total=None)
        made = service.warm(image, size, memory_mib, cpu_count, accel, network, hot,
                            lambda done, total: progress.update(task, completed=done, total=total))
    typer.echo(f"{len(made)} member(s) {'made or heated' if hot else 'warmed'} for {image}")


@pool_app.command("ls")
def pool_ls(format_: Optional[str] = typer.Option(None, "--format", help="'json' for one object per line.")) -> None:
    """List pools: mode (save, clone: hot template clones, or template), image, VM size, ready
    members (HOT: of those, how many wait paused) and stale ones, or templates, save (or
    template state) file size, a template's RAM file size in tmpfs, and why each is kept:
    'manual (pool warm)', or a kvmc serve's automatic pool with when the image was last run."""
    rows = _services().pools.summary()
    if format_ == "json":
        for row in rows:
            typer.echo(json.dumps(row))
        return
    typer.echo(f"{'MODE':<10}{'IMAGE':<28}{'MEMORY':>8}{'CPUS':>6}{'ACCEL':>7}{'READY':>7}{'HOT':>5}"
               f"{'STALE':>7}{'SAVE':>10}{'RAM':>10}  WHY")
    for r in rows:
        ram = f"{r['ram_mib']:>8}Mi" if r["mode"] == "template" else f"{'-':>10}"
        hot = r["hot"] if r["mode"] in ("save", "clone") else "-"
        typer.echo(f"{r['mode']:<10}{r['image'][:26]:<28}{r['memory_mib']:>6}Mi{r['cpus']:>6}{r['accel']:>7}"
                   f"{r['ready']:>7}{hot:>5}{r['stale']:>7}{r['save_mib']:>8}Mi{ram}  {r.get('why', '')}")


@pool_app.command("rm")
def pool_rm(
    image: Optional[str] = typer.Argument(None, help="Only this image's members and templates (default: all)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Only 'save' members or only 'template's."),
) -> None:
    """Remove pool members and templates: their saved state, disks, RAM files and domains."""
    members, templates = _services().pools.remove(image, mode)
    typer.echo(f"removed {members} member(s) and {templates} template(s)")


@pool_app.command("gc")
def pool_gc() -> None:
    """Remove members and templates made from an image or guest kernel that has changed, and
    abandoned warm-ups."""
    members, templates = _services().pools.gc()
    typer.echo(f"removed {members} stale member(s) and {templates} stale template(s)")


@volume_app.command("create")
def volume_create(
    name: str = typer.Argument(..., help="Volume name: letters, digits and _.-"),
    size: str = typer.Option("1g", "--size", help="Disk size (sparse: only written blocks use space)."),
    driver: Optional[str] = typer.Option(
        None, "--driver", "-d",
        help="kvmc-ext4 (a disk: one running container at a time) or kvmc-dir (a host directory "
             "any number of running containers share); default: config volume_driver."),
) -> None:
    """Create a named volume (an ext4 disk image, or a shared host directory)."""
    from kvmc.volumes import parse_size

    typer.echo(_services().volumes.create(name, parse_size(size), driver=driver).name)


@volume_app.command("ls")
def volume_ls(quiet: bool = typer.Option(False, "-q", "--quiet", help="Only show names.")) -> None:
    """List named volumes."""
    views = _services().volumes.list()
    if quiet:
        for view in views:
            typer.echo(view.volume.name)
        return
    typer.echo(f"{'VOLUME NAME':<32}{'SIZE':>10}{'USED':>10}")
    for view in views:
        v = view.volume
        typer.echo(f"{v.name:<32}{v.size_bytes / 2**20:>8.0f}Mi{view.usage_bytes / 2**20:>8.1f}Mi")


@volume_app.command("inspect")
def volume_inspect(names: List[str] = typer.Argument(..., help="Volume names.")) -> None:
    """Show volumes as JSON, with the containers that mount them."""
    service = _services().volumes
    typer.echo(json.dumps([service.get(n).to_dict() for n in names], indent=2))


@volume_app.command("rm")
def volume_rm(names: List[str] = typer.Argument(..., help="Volume names.")) -> None:
    """Remove volumes and their data; a volume that a container still mounts is refused."""
    _report_each(for_each(names, _services().volumes.remove))


@network_app.command("create")
def network_create(
    name: str = typer.Argument(..., help="Network name: letters, digits and _.-"),
    subnet: Optional[str] = typer.Option(None, "--subnet", help="IPv4 subnet (default: the next free one of "
                                         "docker's pools, 172.18.0.0/16 and up)."),
    gateway: Optional[str] = typer.Option(None, "--gateway", help="The network's own address, where its DNS "
                                          "server answers (default: the subnet's first)."),
    internal: bool = typer.Option(False, "--internal", help="No outbound access for containers only on "
                                  "internal networks (no user-mode NIC)."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="KEY=VALUE, repeatable."),
    driver: Optional[str] = typer.Option(None, "--driver", "-d", help="bridge (the only one)."),
) -> None:
    """Create a network; its namespace and DNS server exist while a container on it runs."""
    labels = dict(item.split("=", 1) if "=" in item else (item, "") for item in (label or []))
    typer.echo(_services().networks.create(name, driver, labels, internal, subnet=subnet, gateway=gateway).id)


@network_app.command("ls")
def network_ls(quiet: bool = typer.Option(False, "-q", "--quiet", help="Only show ids.")) -> None:
    """List networks (docker's bridge, host and none are listed too)."""
    views = _services().networks.views()
    if quiet:
        for view in views:
            typer.echo(view.network.short_id)
        return
    rows = [("NETWORK ID", "NAME", "DRIVER", "SUBNET", "CONTAINERS")]
    for view in views:
        n = view.network
        rows.append((n.short_id, n.name, n.driver, n.subnet or "-",
                     str(len(view.containers)) if not n.builtin else "-"))
    widths = [max(len(row[i]) for row in rows) + 3 for i in range(4)]
    for row in rows:
        typer.echo("".join(c.ljust(w) for c, w in zip(row, widths)) + row[4])


@network_app.command("inspect")
def network_inspect(names: List[str] = typer.Argument(..., help="Network names or id prefixes.")) -> None:
    """Show networks as JSON, with their containers and addresses."""
    service = _services().networks
    typer.echo(json.dumps([service.inspect(n).to_dict() for n in names], indent=2))


@network_app.command("rm")
def network_rm(names: List[str] = typer.Argument(..., help="Network names or id prefixes.")) -> None:
    """Remove networks; one that containers are attached to is refused (they are named)."""
    _report_each(for_each(names, _services().networks.remove))


@network_app.command("prune")
def network_prune() -> None:
    """Remove every network no container is attached to."""
    for name in _services().networks.prune():
        typer.echo(f"Deleted network: {name}")


@network_app.command("connect")
def network_connect(
    network: str = typer.Argument(..., help="Network name or id prefix."),
    container: str = typer.Argument(..., help="Container name or id prefix."),
    alias: Optional[List[str]] = typer.Option(None, "--alias", help="One more name on this network (repeatable)."),
) -> None:
    """Attach a created or stopped container to a network (its NIC comes with its next start).

    A running container is refused: its VM cannot get a NIC while it runs (no hotplug on
    microvm's virtio-mmio); stop it, connect, start it."""
    _services().networks.connect(network, container, list(alias or []))


@network_app.command("disconnect")
def network_disconnect(
    network: str = typer.Argument(..., help="Network name or id prefix."),
    container: str = typer.Argument(..., help="Container name or id prefix."),
    force: bool = typer.Option(False, "--force", "-f", help="No error if it is not attached."),
) -> None:
    """Detach a created or stopped container from a network."""
    _services().networks.disconnect(network, container, force)


@app.command()
def gc(force: bool = typer.Option(False, "--force", "-f", help="Remove what is found instead of listing it.")) -> None:
    """Find what a crash left behind (kvmc VMs no container record owns, taps, network namespaces and DNS
    servers no running container uses) and, with --force, remove it."""
    for name in _services().system.gc(force):
        typer.echo(f"{'removed' if force else 'orphan'} {name}")


@system_app.command("df")
def system_df() -> None:
    """Show the disk space used by images and containers, and what prune could reclaim."""
    usage = _services().system.disk_usage()
    typer.echo(f"{'TYPE':<12}{'TOTAL':>7}{'ACTIVE':>8}{'SIZE':>12}{'RECLAIMABLE':>14}")
    for kind, key, active in (("Images", "images", "active"), ("Containers", "containers", "running"),
                              ("Volumes", "volumes", "active")):
        u = usage[key]
        typer.echo(f"{kind:<12}{u['count']:>7}{u[active]:>8}{u['bytes'] / 1e6:>10.1f}MB{u['reclaimable'] / 1e6:>12.1f}MB")


@system_app.command("boot")
def system_boot() -> None:
    """Start again the containers whose restart policy wants them running (always; unless-stopped
    unless stopped by a user; on-failure after a failure), as docker's daemon does when it starts:
    for hosts that run no 'kvmc serve' (which does this itself), e.g. from a boot-time unit."""
    reports = _services().system.boot()
    for report in reports:
        if report.ok:
            typer.echo(f"started {report.ref}")
        else:
            typer.echo(f"kvmc: cannot start {report.ref}: {report.error}", err=True)
    if any(not r.ok for r in reports):
        raise typer.Exit(1)


@system_app.command("prune")
def system_prune(
    all_: bool = typer.Option(False, "-a", "--all", help="Also remove every image no container uses."),
) -> None:
    """Remove stopped containers (and with -a, unused images)."""
    removed, deleted = _services().system.prune(all_)
    for name in removed:
        typer.echo(f"Deleted container: {name}")
    for image in deleted:
        typer.echo(f"Deleted image: {image}")


@host_app.command("create")
def host_create(
    name: str = typer.Argument(..., help="Host name: letters, digits and _.-"),
    cache: Optional[str] = typer.Option(None, "--cache", help="Named volume for /var/lib/docker (created if "
                                        "missing): images and build cache outlive the host."),
    memory: Optional[str] = typer.Option(None, "-m", "--memory", help="VM memory, e.g. 2g (default 1g)."),
    cpus: Optional[str] = typer.Option(None, "--cpus", help="Number of vCPUs (default from config: 1)."),
    ttl: Optional[str] = typer.Option(None, "--ttl", help="Lifetime (e.g. 30m, 2h): 'kvmc host gc' removes the "
                                      "host after it."),
) -> None:
    """Boot a host running Docker Engine, wait until the engine answers, and print its DOCKER_HOST
    (a unix socket only you can use, forwarded over SSH) as the last line."""
    from kvmc.options import parse_duration

    record = _services().hosts.create(
        name, cache=cache, memory_mib=parse_memory(memory) if memory else None,
        cpus=parse_cpus(cpus) if cpus else None, ttl_s=parse_duration(ttl, "--ttl") if ttl else None,
        progress=lambda m: typer.echo(m, err=True))
    typer.echo(record.docker_host)


@host_app.command("ls")
def host_ls() -> None:
    """List hosts: name, state, DOCKER_HOST, cache volume, age, TTL."""
    import time

    from kvmc.views import human_duration

    now = time.time()
    typer.echo(f"{'NAME':<20}{'STATE':<14}{'DOCKER_HOST':<44}{'CACHE':<16}{'AGE':<14}TTL")
    for view in _services().hosts.list():
        r = view.record
        ttl = "-" if r.ttl_s is None else ("expired" if r.expired(now) else
                                           f"{human_duration(r.created + r.ttl_s - now)} left")
        typer.echo(f"{r.name:<20}{view.state:<14}{r.docker_host:<44}{r.cache or '-':<16}"
                   f"{human_duration(now - r.created):<14}{ttl}")


@host_app.command("ssh", context_settings={"allow_interspersed_args": False})
def host_ssh(
    name: str = typer.Argument(..., help="Host name."),
    command: Optional[List[str]] = typer.Argument(None, help="Command to run (default: an interactive shell)."),
) -> None:
    """Run a command (or a shell) as root in a host, over SSH with its own key."""
    import shlex

    raise typer.Exit(_services().hosts.ssh(name, shlex.join(command) if command else None))


@host_app.command("rm")
def host_rm(names: List[str] = typer.Argument(..., help="Host names.")) -> None:
    """Remove hosts: VM, forwarder, keys and socket (a cache volume stays)."""
    _report_each(for_each(names, lambda n: _services().hosts.remove(n).name))


@host_app.command("gc")
def host_gc() -> None:
    """Remove hosts past their TTL and what a crash left (unfinished creates, stopped VMs,
    host VMs or sockets with no host)."""
    for what in _services().hosts.gc():
        typer.echo(f"removed {what}")


@host_app.command("build")
def host_build(force: bool = typer.Option(False, "--force", help="Rebuild even if up to date.")) -> None:
    """Build the image kvmc/docker-host from Debian packages (mmdebstrap), unless the stored one
    was built from the same package versions."""
    image = _services().hosts.build_image(force=force, progress=lambda m: typer.echo(m, err=True))
    typer.echo(f"{', '.join(image.tags)}: {image.id}")


DEFAULT_API_SOCKET = "unix:///run/kvmc/docker.sock"


@app.command()
def serve(
    host: Optional[List[str]] = typer.Option(
        None, "--host", "-H", help="Where to listen: unix:///path (default unix:///run/kvmc/docker.sock) or "
        "tcp://127.0.0.1:PORT (loopback only: the API gives root on this host to whoever reaches it). Repeatable."),
) -> None:
    """Serve the Docker Engine API (1.50) so the docker CLI, docker-py and compose drive kvmc.

    Runs in the foreground and logs to stderr; SIGTERM or Ctrl-C stops the server and leaves
    every container running. Point a client at it with
    export DOCKER_HOST=unix:///run/kvmc/docker.sock
    """
    from kvmc.api.server import serve as serve_api

    def log(message: str) -> None:
        print(f"kvmc serve: {message}", file=sys.stderr, flush=True)

    services = _services()
    services.host.notice = log
    serve_api(services, list(host or [DEFAULT_API_SOCKET]), log)


@app.command()
def info() -> None:
    """Show the host setup: libvirt, guest kernel, and the accelerator kvmc will use."""
    facts = _services().system.info()
    typer.echo(f"data dir:     {facts.data_dir}")
    typer.echo(f"libvirt:      {facts.libvirt_uri}")
    typer.echo(f"guest kernel: {facts.guest_kernel} ({facts.kernel_release})")
    typer.echo(f"accelerator:  {facts.accel} ({facts.accel_reason})")


_GLOBAL_FLAGS = ("-v", "--verbose")
"""The app callback's options, which may come before the command's name (``kvmc -v run``)."""


def _app_for(argv: list[str]) -> typer.Typer:
    """``app`` with only the command ``argv`` names, when it names one.

    Why: typer turns every registered command's signature into click parameters on each call
    (get_type_hints and a click Parameter per option): ~25 ms for kvmc's ~50 commands, a tenth
    of a hot ``kvmc run``, of which only the invoked command's part is used. The slim copy
    parses, helps and fails exactly as the full app for that command; anything else (no
    command, ``--help``, a name that is no command) gets the full app, which lists them all."""
    words = [arg for arg in argv if arg not in _GLOBAL_FLAGS]
    if not words or words[0].startswith("-"):
        return app
    name = words[0]
    commands = [c for c in app.registered_commands
                if (c.name or typer.main.get_command_name(c.callback.__name__)) == name]
    groups = [g for g in app.registered_groups if g.name == name]
    if not commands and not groups:
        return app
    slim = copy.copy(app)
    slim.registered_commands, slim.registered_groups = commands, groups
    return slim


def _exit_code() -> int:
    """Run the command line's command; the exit code docker would give."""
    try:
        # returns the code of a typer.Exit raised by a command
        code = _app_for(sys.argv[1:])(standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return 130
    except typer.TyperException as exc:  # bad flags or arguments: docker exits 125 for these
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"kvmc: {exc}", file=sys.stderr)
        return 125
    except KvmcError as exc:
        print(f"kvmc: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else 0


def _leave(code: int) -> NoReturn:
    """Exit at once, without the interpreter's teardown when nothing needs it.

    Why: freeing every module's objects and closing the libvirt connection at exit took
    25-45 ms of every kvmc call (a sixth of a hot ``kvmc run``), and nothing waits for it:
    libvirtd drops a closed client's connection, and what kvmc leaves running (monitors,
    refills) are processes of their own. Output is flushed first; a non-daemon thread still
    running (which Python's exit would wait for) gets the normal exit."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a reader that went away (kvmc ps | head): nothing more to say to it
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    os._exit(code)


def main() -> None:
    """Console entry point: run the app, turning every failure into docker's exit codes."""
    _leave(_exit_code())

if __name__ == "__main__":
    main()
