"""docker's JSON views of kvmc's containers, for both front doors: ``kvmc inspect``/``ps
--format`` and the API's ``/containers/{id}/json`` and ``/containers/json`` are these shapes.

Pure functions, no store access. The shapes follow moby's swagger (v28.2.2) where clients read
a field and stay minimal elsewhere (notes §5). Fields that docker's Go types always emit are
present even when kvmc has nothing to say (``null``, ``""``, ``0``), because some clients
index them without checking (docker-py's ``LogConfig`` lookup raised KeyError on a fake
without it). kvmc's own facts go under a ``Kvmc`` key, which docker's clients ignore.

Records are read by attribute with defaults, and their parts (process, ports, mounts) as
either dicts (schema 1 records) or the typed objects of kvmc/state.py, so the same code
serves every record shape and test doubles alike.

Why below kvmc/api: the CLI renders the same objects (one shape serves scripts for both doors)
and must not import the API server; kvmc/api/shapes.py re-exports these.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Any, Mapping

from kvmc.network import GATEWAY, GUEST_ADDRESS, GUEST_PREFIX

DRIVER = "kvmc"
"""Storage driver and runtime name kvmc reports (docker says overlay2 and runc)."""
LOG_DRIVER = "json-file"
"""What inspect must say for docker-py's ``run()`` to return the output (notes §5)."""
RUNNING_STATES = ("running", "starting")
LIVE_STATES = (*RUNNING_STATES, "restarting")
"""docker's State.Running is true for these (a restarting container counts as running)."""
DEFAULT_SHM_BYTES = 64 << 20


def sha256_id(image_id: str) -> str:
    """Docker's ``sha256:<hex>`` form of an image id (kvmc stores bare hex)."""
    return image_id if image_id.startswith("sha256:") or not image_id else f"sha256:{image_id}"


def _attr(record: Any, name: str, default: Any = None) -> Any:
    value = getattr(record, name, default)
    return default if value is None else value


def _get(part: Any, key: str, default: Any = None) -> Any:
    """A field of a record part: a dict (old records, tests) or a dataclass (ContainerProcess,
    PortMapping, Mount)."""
    value = part.get(key, default) if isinstance(part, Mapping) else getattr(part, key, default)
    return default if value is None else value


def _args(record: Any) -> list[str]:
    return list(_get(getattr(record, "process", None) or {}, "args", []))


def _state_name(record: Any) -> str:
    return str(getattr(record, "state", "created"))


def is_paused(record: Any, vm_state: str | None = None) -> bool:
    return bool(_attr(record, "paused", False)) or vm_state == "paused"


def _options(record: Any) -> Any:
    """The record's kvmc.options.ContainerOptions (a default one for records without)."""
    from kvmc.options import ContainerOptions

    options = getattr(record, "options", None)
    return options if isinstance(options, ContainerOptions) else ContainerOptions.from_dict(options)


def health_words(record: Any) -> str | None:
    """What ``docker ps`` adds to Up ...: healthy, unhealthy, health: starting (None without a check)."""
    health = getattr(record, "health", None)
    if health is None or _state_name(record) not in RUNNING_STATES:
        return None
    status = _get(health, "status", "starting")
    return "health: starting" if status == "starting" else status


def docker_state(record: Any, vm_state: str | None = None) -> str:
    """Docker's State.Status: created | running | paused | restarting | exited (``starting`` is
    running: the start call already returned to the client)."""
    state = _state_name(record)
    if state in RUNNING_STATES:
        return "paused" if is_paused(record, vm_state) else "running"
    return state


def network_name(record: Any) -> str:
    """Docker's name for the container's network mode: its first kvmc network, else ``bridge``
    for the user-mode network (what docker calls its default), else ``none``."""
    explicit = getattr(record, "network_mode", None)
    if explicit:
        return str(explicit)
    networks = getattr(record, "networks", None) or []
    if networks:
        return str(_get(networks[0], "network"))
    network = getattr(record, "network", "none") or "none"
    return {"user": "bridge"}.get(network, network)


def _empty_endpoint() -> dict[str, Any]:
    return {
        "IPAMConfig": None, "Links": None, "Aliases": None, "MacAddress": "", "DriverOpts": None,
        "NetworkID": "", "EndpointID": "", "Gateway": "", "IPAddress": "", "IPPrefixLen": 0,
        "IPv6Gateway": "", "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0, "DNSNames": None,
    }


def _endpoint(record: Any, running: bool) -> dict[str, Any]:
    """EndpointSettings for slirp's fixed guest address (kvmc/network.py)."""
    attached = running and getattr(record, "network", "none") == "user"
    endpoint = _empty_endpoint()
    if attached:
        endpoint.update(Gateway=GATEWAY, IPAddress=GUEST_ADDRESS, IPPrefixLen=GUEST_PREFIX)
    return endpoint


def _network_endpoint(record: Any, endpoint: Any, running: bool) -> dict[str, Any]:
    """EndpointSettings on a kvmc network: its address while the container runs."""
    data = _empty_endpoint()
    aliases = list(_get(endpoint, "aliases", []) or [])
    data.update(Aliases=aliases or None, NetworkID=_get(endpoint, "network_id", ""),
                EndpointID=(_get(endpoint, "network_id", "")[:32] + str(getattr(record, "id", ""))[:32]))
    address = _get(endpoint, "address", "")
    if running and address:
        data.update(IPAddress=address, IPPrefixLen=int(_get(endpoint, "prefix", 0) or 0),
                    Gateway=_get(endpoint, "gateway", ""), MacAddress=_get(endpoint, "mac", ""))
    name = str(getattr(record, "name", ""))
    short = str(getattr(record, "id", ""))[:12]
    data["DNSNames"] = list(dict.fromkeys(n for n in (name, short, *aliases) if n))
    return data


def _networks(record: Any, running: bool) -> dict[str, Any]:
    networks = getattr(record, "networks", None) or []
    if not networks:
        return {network_name(record): _endpoint(record, running)}
    # On kvmc networks docker shows those only (the user-mode NIC is kvmc's way out, as the
    # default gateway of a docker bridge network is).
    return {str(_get(ep, "network")): _network_endpoint(record, ep, running) for ep in networks}


def _port_key(port: Any) -> str:
    return f"{_get(port, 'guest_port')}/{_get(port, 'protocol', 'tcp')}"


def _exposed(record: Any) -> list[str]:
    """Exposed ``PORT/proto`` keys: the ones asked for plus every published one."""
    keys = {str(k) for k in _attr(record, "exposed_ports", [])} | {str(k) for k in _options(record).expose}
    keys.update(_port_key(p) for p in _attr(record, "ports", []))
    return sorted(keys, key=lambda k: (int(k.split("/")[0]), k))


def _summary_ports(record: Any) -> list[dict[str, Any]]:
    published = [{"IP": _get(p, "host_ip") or "0.0.0.0", "PrivatePort": int(_get(p, "guest_port")),
                  "PublicPort": int(_get(p, "host_port")), "Type": _get(p, "protocol", "tcp")}
                 for p in _attr(record, "ports", [])]
    bound = {_port_key(p) for p in _attr(record, "ports", [])}
    exposed_only = [{"PrivatePort": int(k.split("/")[0]), "Type": k.split("/")[1]}
                    for k in _exposed(record) if k not in bound]
    return published + exposed_only


def _port_map(record: Any, running: bool) -> dict[str, Any]:
    """NetworkSettings.Ports: bindings while running (``docker port``, docker-py ``.ports``)."""
    if not running:
        return {}
    ports: dict[str, Any] = {k: None for k in _exposed(record)}
    for p in _attr(record, "ports", []):
        key = _port_key(p)
        ports[key] = (ports.get(key) or []) + [
            {"HostIp": _get(p, "host_ip") or "0.0.0.0", "HostPort": str(_get(p, "host_port"))}]
    return ports


def _port_bindings(record: Any) -> dict[str, Any]:
    bindings: dict[str, list[dict[str, str]]] = {}
    for p in _attr(record, "ports", []):
        bindings.setdefault(_port_key(p), []).append(
            {"HostIp": "" if _get(p, "host_ip") in (None, "", "0.0.0.0") else _get(p, "host_ip"),
             "HostPort": str(_get(p, "host_port"))})
    return bindings


def _mounts(record: Any, volume_paths: Mapping[str, str] | None) -> list[dict[str, Any]]:
    """The Mounts list: volumes, host directories and tmpfs, as docker reports them."""
    result = []
    for m in _attr(record, "mounts", []):
        kind, source, readonly = _get(m, "kind", ""), _get(m, "source", ""), bool(_get(m, "readonly"))
        entry: dict[str, Any] = {"Type": kind, "Source": source, "Destination": _get(m, "target", ""),
                                 "Mode": "ro" if readonly else "", "RW": not readonly, "Propagation": ""}
        if kind == "volume":
            entry.update(Name=source, Driver="local", Source=(volume_paths or {}).get(source, ""))
        elif kind == "bind":
            entry["Propagation"] = "rprivate"
        result.append(entry)
    return result


def _command_parts(record: Any, image_config: Any = None) -> tuple[list[str] | None, list[str] | None]:
    """Config.Entrypoint and Config.Cmd as docker reports them: merged with the image's.

    The record keeps what was asked (None: "the image's"). With the image's config the
    merge is exact (moby's rules); without it, the parts are recovered from the argv, which
    is entrypoint + cmd: exact when a Cmd was given, otherwise the whole argv shows as Cmd.
    """
    args = _args(record)
    entrypoint, cmd = getattr(record, "entrypoint", None), getattr(record, "cmd", None)
    if entrypoint is not None:
        return entrypoint, cmd
    if image_config is not None:
        return getattr(image_config, "entrypoint", None), cmd if cmd else getattr(image_config, "cmd", None)
    if cmd:
        split = len(args) - len(cmd)
        if split >= 0 and args[split:] == list(cmd):
            return args[:split] or None, cmd
    return None, args or None


def container_summary(record: Any, image_id: str | None = None, now: float = 0.0,
                      volume_paths: Mapping[str, str] | None = None, vm_state: str | None = None,
                      pause_reason: str | None = None) -> dict[str, Any]:
    """One item of ``GET /containers/json`` (names start with "/": the CLI strips one char)."""
    running = _state_name(record) in RUNNING_STATES
    args = _args(record)
    return {
        "Id": record.id,
        "Names": [f"/{record.name}"],
        "Image": record.image,
        "ImageID": sha256_id(image_id or getattr(record, "image_id", "")),
        "Command": " ".join(args),
        "Created": int(parse_time(getattr(record, "created", None)) or 0),
        "Ports": _summary_ports(record),
        "Labels": dict(_attr(record, "labels", {})),
        "State": docker_state(record, vm_state),
        "Status": human_status(_state_name(record), getattr(record, "exit_code", None),
                               getattr(record, "started_at", None), getattr(record, "finished_at", None),
                               now, paused=is_paused(record, vm_state), health=health_words(record),
                               pause_reason=pause_reason),
        "HostConfig": {"NetworkMode": network_name(record)},
        "NetworkSettings": {"Networks": _networks(record, running)},
        "Mounts": _mounts(record, volume_paths),
    }


def _state(record: Any, vm_state: str | None, pid: int | None) -> dict[str, Any]:
    name = _state_name(record)
    running = name in RUNNING_STATES
    state: dict[str, Any] = {
        "Status": docker_state(record, vm_state),
        "Running": running or name == "restarting",
        "Paused": running and is_paused(record, vm_state),
        "Restarting": name == "restarting",
        "OOMKilled": False,
        "Dead": False,
        "Pid": (pid if pid is not None else _attr(record, "monitor_pid", 0)) if running else 0,
        # While it runs again after a restart the record keeps the last exit; docker says 0.
        "ExitCode": 0 if running else _attr(record, "exit_code", 0),
        "Error": _attr(record, "error", ""),
        "StartedAt": _attr(record, "started_at", ZERO_TIME),
        "FinishedAt": _attr(record, "finished_at", ZERO_TIME),
    }
    health = getattr(record, "health", None)
    if health is not None:
        state["Health"] = health.to_docker() if hasattr(health, "to_docker") else health
    return state


def _binds(record: Any) -> list[str] | None:
    binds = [f"{_get(m, 'source')}:{_get(m, 'target')}" + (":ro" if _get(m, "readonly") else "")
             for m in _attr(record, "mounts", []) if _get(m, "kind") in ("volume", "bind")]
    return binds or None


def _tmpfs(record: Any) -> dict[str, str] | None:
    tmpfs = {_get(m, "target"): _get(m, "options", "") for m in _attr(record, "mounts", [])
             if _get(m, "kind") == "tmpfs"}
    return tmpfs or None


def _host_config(record: Any) -> dict[str, Any]:
    options = _options(record)
    return {
        "Binds": _binds(record),
        "ContainerIDFile": "",
        "LogConfig": {"Type": LOG_DRIVER, "Config": dict(_attr(record, "log_opts", {}) or {})},
        "NetworkMode": network_name(record),
        "PortBindings": _port_bindings(record),
        "RestartPolicy": {"Name": options.restart.name, "MaximumRetryCount": options.restart.max_retries},
        "AutoRemove": bool(_attr(record, "auto_remove", False)),
        "VolumeDriver": "",
        "VolumesFrom": None,
        "ConsoleSize": [0, 0],
        "CapAdd": list(options.cap_add) or None,
        "CapDrop": list(options.cap_drop) or None,
        "Dns": list(options.dns),
        "DnsOptions": list(options.dns_options),
        "DnsSearch": list(options.dns_search),
        "ExtraHosts": list(options.extra_hosts) or None,
        "Privileged": options.privileged,
        "PublishAllPorts": options.publish_all,
        "ReadonlyRootfs": bool(_attr(record, "read_only", False)),
        "Tmpfs": _tmpfs(record),
        "Runtime": DRIVER,
        "Memory": int(_attr(record, "memory_mib", 0)) << 20,
        "NanoCpus": int(_attr(record, "cpus", 0)) * 1_000_000_000,
        "Init": options.init,
        "Mounts": None,
        "ShmSize": options.shm_size or DEFAULT_SHM_BYTES,
        "Ulimits": [{"Name": u.name, "Soft": u.soft, "Hard": u.hard} for u in options.ulimits] or None,
    }


def _config(record: Any, image_config: Any = None) -> dict[str, Any]:
    process = getattr(record, "process", None) or {}
    entrypoint, cmd = _command_parts(record, image_config)
    detached = bool(_attr(record, "detached", False))
    config: dict[str, Any] = {
        "Hostname": _get(process, "hostname") or record.id[:12],
        "Domainname": "",
        "User": _get(process, "user", ""),
        "AttachStdin": bool(_attr(record, "attach_stdin", False)),
        "AttachStdout": bool(_attr(record, "attach_stdout", not detached)),
        "AttachStderr": bool(_attr(record, "attach_stderr", not detached)),
        "Tty": bool(_attr(record, "tty", False)),
        "OpenStdin": bool(_attr(record, "open_stdin", _get(process, "stdin", False))),
        "StdinOnce": bool(_attr(record, "stdin_once", False)),
        "Env": list(_get(process, "env", [])),
        "Cmd": cmd,
        "Image": record.image,
        "Volumes": None,
        "WorkingDir": _get(process, "cwd", ""),
        "Entrypoint": entrypoint,
        "OnBuild": None,
        "Labels": dict(_attr(record, "labels", {})),
    }
    exposed = _exposed(record)
    if exposed:
        config["ExposedPorts"] = {k: {} for k in exposed}
    if getattr(record, "stop_signal", None):
        config["StopSignal"] = record.stop_signal
    if getattr(record, "stop_timeout", None) is not None:
        config["StopTimeout"] = record.stop_timeout
    check = _options(record).healthcheck
    if check is not None:
        config["Healthcheck"] = check.to_docker()
    return config


def _network_settings(record: Any, running: bool) -> dict[str, Any]:
    networks = getattr(record, "networks", None) or []
    endpoint = _network_endpoint(record, networks[0], running) if networks else _endpoint(record, running)
    return {
        "Bridge": "", "SandboxID": "", "SandboxKey": "", "HairpinMode": False,
        "LinkLocalIPv6Address": "", "LinkLocalIPv6PrefixLen": 0,
        "Ports": _port_map(record, running),
        "SecondaryIPAddresses": None, "SecondaryIPv6Addresses": None, "EndpointID": "",
        "Gateway": endpoint["Gateway"], "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0,
        "IPAddress": endpoint["IPAddress"], "IPPrefixLen": endpoint["IPPrefixLen"],
        "IPv6Gateway": "", "MacAddress": "",
        "Networks": _networks(record, running),
    }


def _kvmc_extra(record: Any, vm_state: str | None, image_config: Any = None) -> dict[str, Any]:
    """kvmc's own facts: its state word, the VM, how it booted, the agent's sockets."""
    return {
        "State": _state_name(record),
        "Domain": getattr(record, "domain", ""),
        "Accel": getattr(record, "accel", ""),
        "MemoryMiB": getattr(record, "memory_mib", 0),
        "Cpus": getattr(record, "cpus", 0),
        "Boot": getattr(record, "boot", ""),
        "PoolSource": getattr(record, "pool_source", ""),
        "VmState": vm_state,
        "MonitorPid": getattr(record, "monitor_pid", None),
        "Network": getattr(record, "network", ""),
        "GuestUptimeMs": getattr(record, "guest_uptime_ms", None),
        "Mounts": [dict(m) if isinstance(m, Mapping) else dict(vars(m)) for m in _attr(record, "mounts", [])],
        "Ports": [dict(p) if isinstance(p, Mapping) else dict(vars(p)) for p in _attr(record, "ports", [])],
        "AgentSocket": getattr(record, "agent_socket", ""),
        "ControlSocket": getattr(record, "control_socket", ""),
        "RestoreFrom": getattr(record, "restore_from", ""),
        "ResumePaused": bool(getattr(record, "resume_paused", False)),
        "CloneFrom": getattr(record, "clone_from", ""),
        "ImageConfig": None if image_config is None else {
            "ExposedPorts": list(getattr(image_config, "exposed_ports", [])),
            "Volumes": list(getattr(image_config, "volumes", []))},
    }


def container_inspect(record: Any, image_id: str | None = None, vm_state: str | None = None,
                      log_path: str = "", *, pid: int | None = None,
                      volume_paths: Mapping[str, str] | None = None, image_config: Any = None,
                      kvmc: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``GET /containers/{id}/json``.

    ``vm_state`` is the hypervisor's word for the VM (running, paused, shutoff, or None when
    unknown); ``pid`` the host process standing for the container (default: its monitor);
    ``volume_paths`` maps volume names to what Mounts should show as their Source;
    ``image_config`` (kvmc.images.ImageConfig) makes Config.Entrypoint/Cmd exact.
    """
    running = _state_name(record) in RUNNING_STATES
    args = _args(record)
    return {
        "Id": record.id,
        "Created": getattr(record, "created", ZERO_TIME),
        "Path": args[0] if args else "",
        "Args": args[1:],
        "State": _state(record, vm_state, pid),
        "Image": sha256_id(image_id or getattr(record, "image_id", "")),
        "ResolvConfPath": "",
        "HostnamePath": "",
        "HostsPath": "",
        "LogPath": log_path,
        "Name": f"/{record.name}",
        "RestartCount": _attr(record, "restart_count", 0),
        "Driver": DRIVER,
        "Platform": "linux",
        "MountLabel": "",
        "ProcessLabel": "",
        "AppArmorProfile": "",
        "ExecIDs": None,
        "HostConfig": _host_config(record),
        "GraphDriver": {"Name": DRIVER, "Data": None},
        "Mounts": _mounts(record, volume_paths),
        "Config": _config(record, image_config),
        "NetworkSettings": _network_settings(record, running),
        "Kvmc": {**_kvmc_extra(record, vm_state, image_config), **(kvmc or {})},
    }


# ------------------------------------------------------------------------------ images

def _set(keys: list[str]) -> dict[str, dict] | None:
    return {k: {} for k in keys} or None


def _image_created(image: Any) -> int:
    return int(parse_time(getattr(image, "created", None)) or 0)


def image_summary(image: Any) -> dict[str, Any]:
    """One item of ``GET /images/json``."""
    return {
        "Id": sha256_id(image.id),
        "ParentId": "",
        "RepoTags": list(image.tags),
        "RepoDigests": list(_attr(image, "repo_digests", [])),
        "Created": _image_created(image),
        "Size": int(image.size),
        "SharedSize": -1,
        "Containers": -1,
        "Labels": dict(image.config.labels or {}),
    }


def _image_config(image: Any) -> dict[str, Any]:
    """The image's Config; from API 1.50 without the container-only fields."""
    c = image.config
    config: dict[str, Any] = {
        "Cmd": c.cmd,
        "Entrypoint": c.entrypoint,
        "Env": list(c.env or []),
        "WorkingDir": c.working_dir or "",
        "User": c.user or "",
        "ExposedPorts": _set(list(c.exposed_ports or [])),
        "Labels": dict(c.labels) if c.labels else None,
        "Volumes": _set(list(c.volumes or [])),
        "OnBuild": None,
    }
    if c.stop_signal:
        config["StopSignal"] = c.stop_signal
    if getattr(c, "healthcheck", None):
        config["Healthcheck"] = dict(c.healthcheck)
    return config


def image_inspect(image: Any) -> dict[str, Any]:
    """``GET /images/{name}/json`` (compose copies ``Id`` into a label, notes §10)."""
    return {
        "Id": sha256_id(image.id),
        "RepoTags": list(image.tags),
        "RepoDigests": list(_attr(image, "repo_digests", [])),
        "Parent": "",
        "Comment": "",
        "Created": image.created or ZERO_TIME,
        "DockerVersion": "",
        "Author": "",
        "Config": _image_config(image),
        "Architecture": image.architecture or "amd64",
        "Os": image.os or "linux",
        "Size": int(image.size),
        "GraphDriver": {"Name": DRIVER, "Data": None},
        "RootFS": {"Type": "layers", "Layers": list(image.layers or [])},
        "Metadata": {"LastTagTime": ZERO_TIME},
        "Kvmc": {"DiskPath": str(image.disk_path), "DiskSize": image.disk_size},
    }


# -------------------------------------------------------------------------------- time

ZERO_TIME = "0001-01-01T00:00:00Z"
"""Go's zero time.Time in JSON: what docker reports for "never" (StartedAt of a new container)."""


def parse_time(text: str | None) -> float | None:
    """An RFC 3339 timestamp (kvmc writes ``...T12:00:00.123Z``) as epoch seconds."""
    if not text or text == ZERO_TIME:
        return None
    value = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    # Go writes up to nanoseconds; Python parses up to microseconds.
    value = re.sub(r"(\.\d{6})\d+", r"\1", value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def format_time(epoch: float | None) -> str:
    """Epoch seconds as Go's RFC3339Nano in UTC (trailing zeros of the fraction dropped)."""
    if epoch is None:
        return ZERO_TIME
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def human_duration(seconds: float) -> str:
    """go-units HumanDuration, the wording of ``docker ps``' STATUS column."""
    secs = int(seconds)
    if secs < 1:
        return "Less than a second"
    if secs == 1:
        return "1 second"
    if secs < 60:
        return f"{secs} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def human_status(state: str, exit_code: int | None, started_at: str | None, finished_at: str | None,
                 now: float, paused: bool = False, health: str | None = None, pause_reason: str | None = None) -> str:
    """``docker ps``' STATUS, following moby's State.String().

    A container that never started is ``Created`` whatever its state (a failed start
    included, as in docker); ``state`` may be ``paused`` or ``paused`` passed separately;
    ``health`` is what a health check adds (``healthy``, ``health: starting``, ...).
    """
    started = parse_time(started_at)
    if state in ("running", "starting", "paused"):
        up = human_duration(max(0.0, now - started)) if started is not None else "Less than a second"
        if paused or state == "paused":  # kvmc says why when QEMU paused it (a full disk)
            return f"Up {up} (Paused ({pause_reason}))" if pause_reason else f"Up {up} (Paused)"
        return f"Up {up} ({health})" if health else f"Up {up}"
    if state == "restarting":
        finished = parse_time(finished_at)
        ago = human_duration(max(0.0, now - finished)) if finished is not None else "Less than a second"
        return f"Restarting ({exit_code or 0}) {ago} ago"
    if state == "removing":
        return "Removal In Progress"
    if state == "dead":
        return "Dead"
    if started is None:
        return "Created"
    finished = parse_time(finished_at)
    if finished is None:
        return ""
    return f"Exited ({exit_code or 0}) {human_duration(max(0.0, now - finished))} ago"


# ------------------------------------------------------------------------ stats
def container_stats(record: Any, sample: Mapping[str, Any], previous: Mapping[str, Any] | None,
                    read_at: float, previous_at: float | None) -> dict[str, Any]:
    """Docker's stats JSON of a running container from kvmc's samples (Runtime.stats): the
    API's ``/containers/{id}/stats`` and ``kvmc stats`` both read this shape.

    CPU: the VM's vCPU time; the "system" time is wall time times the vCPUs, so the docker
    CLI's percentage (CPU delta / system delta x online CPUs) is the VM's share of one host
    core per vCPU, as docker's is of a cgroup's. Memory: QEMU's resident memory (the guest's
    size when libvirt cannot tell) against the guest's size."""
    ncpu = sample["vcpus"]

    def cpu(s: Mapping[str, Any] | None, at: float | None) -> dict[str, Any]:
        return {"cpu_usage": {"total_usage": s["cpu_ns"] if s else 0, "usage_in_kernelmode": 0,
                              "usage_in_usermode": s["cpu_ns"] if s else 0},
                "system_cpu_usage": int(at * 1e9) * ncpu if at else 0, "online_cpus": ncpu,
                "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0}}

    return {
        "id": record.id, "name": f"/{record.name}",
        "read": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(read_at)) + "Z",
        "preread": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(previous_at)) + "Z" if previous_at
        else ZERO_TIME,
        "cpu_stats": cpu(sample, read_at),
        "precpu_stats": cpu(previous, previous_at),
        "memory_stats": {"usage": sample["rss_kib"] * 1024 or sample["memory_kib"] * 1024,
                         "limit": sample["memory_kib"] * 1024, "stats": {}},
        "pids_stats": {}, "blkio_stats": _blkio(sample), "num_procs": 0,
        # Per guest interface, as Docker's (the CLI's NET I/O sums them); the user-mode NIC
        # (eth0) has no host device to count on, so a container on no kvmc network shows none.
        "networks": dict(sample.get("networks", {})),
    }


def _blkio(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The VM's disk traffic as Docker's cgroup v1 block I/O counters, which the docker CLI's
    BLOCK I/O column and docker-py read (ops "read"/"write", summed over entries): one entry
    each for all of the VM's disks, whose device numbers are the host's business (0:0)."""
    return {"io_service_bytes_recursive": [
        {"major": 0, "minor": 0, "op": "read", "value": sample.get("block_read_bytes", 0)},
        {"major": 0, "minor": 0, "op": "write", "value": sample.get("block_write_bytes", 0)},
    ]}
