"""kvmc's records as the JSON docker's clients read: pure functions, no store access.

The shapes follow moby's swagger (v28.2.2) where clients read a field and stay minimal
elsewhere (notes §5). Fields that docker's Go types always emit are present even when
kvmc has nothing to say (``null``, ``""``, ``0``), because some clients index them
without checking (docker-py's ``LogConfig`` lookup raised KeyError on a fake without it).
kvmc's own facts go under a ``Kvmc`` key, which docker's clients ignore.

Records are read by attribute with defaults, and their parts (process, ports, mounts) as
either dicts (schema 1 records) or the typed objects of kvmc/state.py, so the same code
serves every record shape and test doubles alike.
"""

from __future__ import annotations

import platform
from typing import Any, Mapping

from kvmc import __version__ as KVMC_VERSION
from kvmc.api import API_VERSION, ENGINE_VERSION, MIN_API_VERSION
from kvmc.api.translate import ZERO_TIME, human_status, parse_time
from kvmc.network import GATEWAY, GUEST_ADDRESS, GUEST_PREFIX

DRIVER = "kvmc"
"""Storage driver and runtime name kvmc reports (docker says overlay2 and runc)."""
LOG_DRIVER = "json-file"
"""What inspect must say for docker-py's ``run()`` to return the output (notes §5)."""
RUNNING_STATES = ("running", "starting")


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


def docker_state(record: Any, vm_state: str | None = None) -> str:
    """Docker's State.Status: created | running | paused | exited (``starting`` is running:
    the start call already returned to the client)."""
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
    keys = {str(k) for k in _attr(record, "exposed_ports", [])}
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
                      volume_paths: Mapping[str, str] | None = None, vm_state: str | None = None) -> dict[str, Any]:
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
                               now, paused=is_paused(record, vm_state)),
        "HostConfig": {"NetworkMode": network_name(record)},
        "NetworkSettings": {"Networks": _networks(record, running)},
        "Mounts": _mounts(record, volume_paths),
    }


def _state(record: Any, vm_state: str | None, pid: int | None) -> dict[str, Any]:
    running = _state_name(record) in RUNNING_STATES
    return {
        "Status": docker_state(record, vm_state),
        "Running": running,
        "Paused": running and is_paused(record, vm_state),
        "Restarting": False,
        "OOMKilled": False,
        "Dead": False,
        "Pid": (pid if pid is not None else _attr(record, "monitor_pid", 0)) if running else 0,
        "ExitCode": _attr(record, "exit_code", 0),
        "Error": _attr(record, "error", ""),
        "StartedAt": _attr(record, "started_at", ZERO_TIME),
        "FinishedAt": _attr(record, "finished_at", ZERO_TIME),
    }


def _binds(record: Any) -> list[str] | None:
    binds = [f"{_get(m, 'source')}:{_get(m, 'target')}" + (":ro" if _get(m, "readonly") else "")
             for m in _attr(record, "mounts", []) if _get(m, "kind") in ("volume", "bind")]
    return binds or None


def _tmpfs(record: Any) -> dict[str, str] | None:
    tmpfs = {_get(m, "target"): _get(m, "options", "") for m in _attr(record, "mounts", [])
             if _get(m, "kind") == "tmpfs"}
    return tmpfs or None


def _host_config(record: Any) -> dict[str, Any]:
    return {
        "Binds": _binds(record),
        "ContainerIDFile": "",
        "LogConfig": {"Type": LOG_DRIVER, "Config": dict(_attr(record, "log_opts", {}) or {})},
        "NetworkMode": network_name(record),
        "PortBindings": _port_bindings(record),
        "RestartPolicy": {"Name": _attr(record, "restart_policy", "no") or "no", "MaximumRetryCount": 0},
        "AutoRemove": bool(_attr(record, "auto_remove", False)),
        "VolumeDriver": "",
        "VolumesFrom": None,
        "ConsoleSize": [0, 0],
        "CapAdd": None,
        "CapDrop": None,
        "Dns": list(_attr(record, "dns", [])),
        "DnsOptions": [],
        "DnsSearch": [],
        "ExtraHosts": list(_attr(record, "extra_hosts", [])) or None,
        "Privileged": False,
        "PublishAllPorts": bool(_attr(record, "publish_all", False)),
        "ReadonlyRootfs": bool(_attr(record, "read_only", False)),
        "Tmpfs": _tmpfs(record),
        "Runtime": DRIVER,
        "Memory": int(_attr(record, "memory_mib", 0)) << 20,
        "NanoCpus": int(_attr(record, "cpus", 0)) * 1_000_000_000,
        "Init": getattr(record, "init", None),
        "Mounts": None,
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


def _kvmc_extra(record: Any, vm_state: str | None) -> dict[str, Any]:
    return {
        "Domain": getattr(record, "domain", ""),
        "Accel": getattr(record, "accel", ""),
        "MemoryMiB": getattr(record, "memory_mib", 0),
        "Cpus": getattr(record, "cpus", 0),
        "Boot": getattr(record, "boot", ""),
        "VmState": vm_state,
        "MonitorPid": getattr(record, "monitor_pid", None),
        "Network": getattr(record, "network", ""),
        "GuestUptimeMs": getattr(record, "guest_uptime_ms", None),
        "Mounts": [dict(m) if isinstance(m, Mapping) else dict(vars(m)) for m in _attr(record, "mounts", [])],
    }


def container_inspect(record: Any, image_id: str | None = None, vm_state: str | None = None,
                      log_path: str = "", *, pid: int | None = None,
                      volume_paths: Mapping[str, str] | None = None, image_config: Any = None) -> dict[str, Any]:
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
        "RestartCount": 0,
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
        "Kvmc": _kvmc_extra(record, vm_state),
    }


def wait_json(status_code: int, error: str | None = None) -> dict[str, Any]:
    """The body ``/wait`` ends with; a set ``Error`` makes the CLI exit 125."""
    return {"StatusCode": status_code, "Error": {"Message": error} if error else None}


# ---------------------------------------------------------------------------------- images

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


# ---------------------------------------------------------------------------------- volumes

def volume_json(volume: Any, mountpoint: str) -> dict[str, Any]:
    """A volume as ``/volumes`` reports it; ``Driver`` is ``local`` for clients that check."""
    return {
        "Name": volume.name,
        "Driver": "local",
        "Mountpoint": mountpoint,
        "CreatedAt": volume.created,
        "Labels": dict(_attr(volume, "labels", {})),
        "Scope": "local",
        "Options": dict(_attr(volume, "options", {})),
        "Kvmc": {"Disk": getattr(volume, "path", ""), "SizeBytes": getattr(volume, "size_bytes", 0)},
    }


# ---------------------------------------------------------------------------------- system

def version_json(kernel_release: str, arch: str = "amd64") -> dict[str, Any]:
    """``GET /version``: docker-py takes ``ApiVersion`` from here to pick its API version."""
    details = {"ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION, "Os": "linux", "Arch": arch,
               "KernelVersion": kernel_release, "Experimental": "false", "GitCommit": "", "GoVersion": "",
               "BuildTime": ""}
    python = f"python{platform.python_version()}"
    return {
        "Platform": {"Name": f"kvmc {KVMC_VERSION}"},
        "Components": [
            {"Name": "Engine", "Version": ENGINE_VERSION, "Details": details},
            {"Name": "kvmc", "Version": KVMC_VERSION, "Details": {"Runtime": python}},
        ],
        "Version": ENGINE_VERSION,
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "GitCommit": f"kvmc-{KVMC_VERSION}",
        "GoVersion": python,
        "Os": "linux",
        "Arch": arch,
        "KernelVersion": kernel_release,
        "BuildTime": "",
    }


def info_json(*, name: str, ncpu: int, mem_total: int, kernel_release: str, operating_system: str,
              containers: int = 0, running: int = 0, paused: int = 0, stopped: int = 0, images: int = 0,
              root_dir: str = "", server_id: str = "", system_time: str = ZERO_TIME,
              warnings: list[str] | None = None, architecture: str = "x86_64",
              kvmc: dict[str, Any] | None = None) -> dict[str, Any]:
    """``GET /info``. The cgroup capability flags are all true (VIC did the same) so the CLI
    prints no "no memory limit support" warnings: a VM enforces memory and CPUs itself."""
    info: dict[str, Any] = {
        "ID": server_id, "Containers": containers, "ContainersRunning": running,
        "ContainersPaused": paused, "ContainersStopped": stopped, "Images": images,
        "Driver": DRIVER, "DriverStatus": [],
        "Plugins": {"Volume": ["local"], "Network": ["bridge", "none"], "Authorization": None,
                    "Log": [LOG_DRIVER]},
        "MemoryLimit": True, "SwapLimit": True, "CpuCfsPeriod": True, "CpuCfsQuota": True,
        "CPUShares": True, "CPUSet": True, "PidsLimit": True, "OomKillDisable": True,
        "IPv4Forwarding": True, "BridgeNfIptables": True, "BridgeNfIp6tables": True,
        "Debug": False, "NFd": 0, "NGoroutines": 0, "SystemTime": system_time,
        "LoggingDriver": LOG_DRIVER, "CgroupDriver": "none", "CgroupVersion": "2",
        "NEventsListener": 0, "KernelVersion": kernel_release, "OperatingSystem": operating_system,
        "OSVersion": "", "OSType": "linux", "Architecture": architecture,
        "IndexServerAddress": "https://index.docker.io/v1/",
        "RegistryConfig": {"InsecureRegistryCIDRs": ["::1/128", "127.0.0.0/8"], "Mirrors": [],
                           "IndexConfigs": {"docker.io": {"Name": "docker.io", "Mirrors": [],
                                                          "Secure": True, "Official": True}}},
        "NCPU": ncpu, "MemTotal": mem_total, "GenericResources": None, "DockerRootDir": root_dir,
        "HttpProxy": "", "HttpsProxy": "", "NoProxy": "", "Name": name, "Labels": [],
        "ExperimentalBuild": False, "ServerVersion": ENGINE_VERSION,
        "Runtimes": {DRIVER: {"path": "kvmc"}}, "DefaultRuntime": DRIVER,
        "Swarm": {"NodeID": "", "NodeAddr": "", "LocalNodeState": "inactive", "ControlAvailable": False,
                  "Error": "", "RemoteManagers": None},
        "LiveRestoreEnabled": False, "Isolation": "", "InitBinary": "",
        "ContainerdCommit": {"ID": ""}, "RuncCommit": {"ID": ""}, "InitCommit": {"ID": ""},
        "SecurityOptions": [], "Warnings": list(warnings or []),
    }
    if kvmc is not None:
        info["Kvmc"] = kvmc
    return info


def event_json(type: str, action: str, id: str, attributes: Mapping[str, str], time_ns: int) -> dict[str, Any]:
    """One ``/events`` message; compose reads ``Actor.Attributes`` (name, exitCode, labels)
    and ``timeNano``. The deprecated ``status``/``id``/``from`` are filled as moby does."""
    message: dict[str, Any] = {
        "Type": type,
        "Action": action,
        "Actor": {"ID": id, "Attributes": dict(attributes)},
        "scope": "local",
        "time": time_ns // 1_000_000_000,
        "timeNano": time_ns,
    }
    if type in ("container", "image"):
        message.update(status=action, id=id)
    if type == "container":
        message["from"] = attributes.get("image", "")
    return message


def exec_json(exec_id: str, container_id: str, *, running: bool, exit_code: int | None, tty: bool,
              args: list[str], user: str = "", open_stdin: bool = False, open_stdout: bool = True,
              open_stderr: bool = True, pid: int = 0) -> dict[str, Any]:
    """``GET /exec/{id}/json``; ``ExitCode`` is null while running (``docker exec`` takes
    its exit code from here right after the stream ends, notes §3.3)."""
    return {
        "ID": exec_id,
        "ContainerID": container_id,
        "Running": running,
        "ExitCode": None if running else exit_code,
        "ProcessConfig": {"tty": tty, "entrypoint": args[0] if args else "", "arguments": args[1:],
                          "privileged": False, "user": user},
        "OpenStdin": open_stdin,
        "OpenStdout": open_stdout,
        "OpenStderr": open_stderr,
        "CanRemove": False,
        "DetachKeys": "",
        "Pid": pid,
    }
