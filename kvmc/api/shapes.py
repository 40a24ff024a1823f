"""kvmc's records as the JSON docker's clients read: pure functions, no store access.

Containers' shapes (inspect, list items) are kvmc/views.py's, shared with the CLI; this module
re-exports them and holds the API's own: images, volumes, version, info, events, execs.

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
from kvmc.api.translate import ZERO_TIME
from kvmc.views import (DRIVER, LOG_DRIVER, RUNNING_STATES, container_inspect, container_stats,  # noqa: F401
                        container_summary, docker_state, image_inspect, image_summary, is_paused, network_name,
                        sha256_id)
from kvmc.views import _attr


def wait_json(status_code: int, error: str | None = None) -> dict[str, Any]:
    """The body ``/wait`` ends with; a set ``Error`` makes the CLI exit 125."""
    return {"StatusCode": status_code, "Error": {"Message": error} if error else None}


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
        "Kvmc": {"Disk": getattr(volume, "path", ""), "SizeBytes": getattr(volume, "size_bytes", 0),
                 "Driver": getattr(volume, "driver", "kvmc-ext4")},
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
              open_stderr: bool = True, pid: int = 0, privileged: bool = False) -> dict[str, Any]:
    """``GET /exec/{id}/json``; ``ExitCode`` is null while running (``docker exec`` takes
    its exit code from here right after the stream ends, notes §3.3)."""
    return {
        "ID": exec_id,
        "ContainerID": container_id,
        "Running": running,
        "ExitCode": None if running else exit_code,
        "ProcessConfig": {"tty": tty, "entrypoint": args[0] if args else "", "arguments": args[1:],
                          "privileged": privileged, "user": user},
        "OpenStdin": open_stdin,
        "OpenStdout": open_stdout,
        "OpenStderr": open_stderr,
        "CanRemove": False,
        "DetachKeys": "",
        "Pid": pid,
    }
