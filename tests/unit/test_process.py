"""kvmc.process: the container process docker would compute from image config + run flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmc.errors import UsageError
from kvmc.images import ImageConfig
from kvmc.process import (
    ProcessOptions,
    build_process,
    merge_env,
    parse_cpus,
    parse_memory,
    read_env_file,
)

NGINX = ImageConfig(
    entrypoint=["/docker-entrypoint.sh"],
    cmd=["nginx", "-g", "daemon off;"],
    env=["PATH=/usr/local/sbin:/usr/bin:/bin", "NGINX_VERSION=1.25"],
    working_dir="/srv",
    user="nginx",
)
BUSYBOX = ImageConfig(cmd=["sh"], env=["PATH=/bin"])
BARE = ImageConfig()


def build(config: ImageConfig = BUSYBOX, host_env: dict | None = None, **opts) -> dict:
    return build_process(config, ProcessOptions(**opts), host_env={} if host_env is None else host_env)


# --- args: entrypoint + cmd ---------------------------------------------------------------

def test_image_defaults():
    assert build(NGINX)["args"] == ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"]
    assert build(BUSYBOX)["args"] == ["sh"]


def test_command_replaces_cmd_keeps_entrypoint():
    assert build(NGINX, command=["nginx", "-t"])["args"] == ["/docker-entrypoint.sh", "nginx", "-t"]
    assert build(BUSYBOX, command=["echo", "hi"])["args"] == ["echo", "hi"]


def test_entrypoint_only_image():
    config = ImageConfig(entrypoint=["/bin/app", "--serve"])
    assert build(config)["args"] == ["/bin/app", "--serve"]
    assert build(config, command=["--port", "80"])["args"] == ["/bin/app", "--serve", "--port", "80"]


def test_entrypoint_flag_drops_image_cmd():
    assert build(NGINX, entrypoint="/bin/sh")["args"] == ["/bin/sh"]
    assert build(BUSYBOX, entrypoint="/bin/true")["args"] == ["/bin/true"]


def test_entrypoint_flag_with_command():
    assert build(NGINX, entrypoint="/bin/sh", command=["-c", "id"])["args"] == ["/bin/sh", "-c", "id"]


def test_empty_entrypoint_clears_it():
    assert build(NGINX, entrypoint="", command=["ls", "-l"])["args"] == ["ls", "-l"]


def test_empty_entrypoint_without_command_is_usage_error():
    # The image cmd is dropped too, so nothing is left to run.
    with pytest.raises(UsageError, match="no command"):
        build(NGINX, entrypoint="")


def test_no_args_at_all():
    with pytest.raises(UsageError, match="no command"):
        build(BARE)
    with pytest.raises(UsageError):
        build(ImageConfig(entrypoint=[], cmd=[]))


def test_command_on_bare_image():
    assert build(BARE, command=["/bin/echo", "x"])["args"] == ["/bin/echo", "x"]


def test_build_does_not_mutate_inputs():
    opts = ProcessOptions(command=["a"], env=["X=1"])
    config = ImageConfig(entrypoint=["e"], cmd=["c"], env=["Y=2"])
    result = build_process(config, opts, host_env={})
    result["args"].append("zzz")
    result["env"].append("Z=3")
    assert opts.command == ["a"] and opts.env == ["X=1"]
    assert config.entrypoint == ["e"] and config.cmd == ["c"] and config.env == ["Y=2"]


# --- env --------------------------------------------------------------------------------

def test_env_image_then_override_by_name_order_kept():
    env = build(NGINX, env=["NGINX_VERSION=2", "NEW=1"])["env"]
    assert env == ["PATH=/usr/local/sbin:/usr/bin:/bin", "NGINX_VERSION=2", "NEW=1"]


def test_env_later_override_wins():
    assert merge_env(["A=1"], ["A=2", "A=3"], {}) == ["A=3"]


def test_env_value_may_contain_equals_and_be_empty():
    assert merge_env([], ["OPTS=a=b=c", "EMPTY="], {}) == ["OPTS=a=b=c", "EMPTY="]


def test_env_name_alone_takes_host_value():
    env = build(BUSYBOX, env=["HOME", "TERM"], host_env={"HOME": "/home/me", "TERM": "xterm"})["env"]
    assert env == ["PATH=/bin", "HOME=/home/me", "TERM=xterm"]


def test_env_name_alone_overrides_image_with_host_value():
    assert merge_env(["PATH=/bin"], ["PATH"], {"PATH": "/host/bin"}) == ["PATH=/host/bin"]


def test_env_name_alone_skipped_when_unset_on_host():
    assert build(BUSYBOX, env=["NOPE"], host_env={})["env"] == ["PATH=/bin"]
    # ...and does not erase the image's value either.
    assert merge_env(["PATH=/bin"], ["PATH"], {}) == ["PATH=/bin"]


def test_env_host_value_may_be_empty():
    assert merge_env([], ["EMPTY"], {"EMPTY": ""}) == ["EMPTY="]


def test_env_without_name_is_usage_error():
    with pytest.raises(UsageError, match="NAME"):
        build(BUSYBOX, env=["=x"])
    with pytest.raises(UsageError):
        merge_env([], [""], {})


def test_env_default_host_env_is_os_environ(monkeypatch):
    monkeypatch.setenv("KVMC_TEST_FROM_HOST", "yes")
    result = build_process(BUSYBOX, ProcessOptions(env=["KVMC_TEST_FROM_HOST"]))
    assert "KVMC_TEST_FROM_HOST=yes" in result["env"]


def test_read_env_file(tmp_path):
    path = tmp_path / "app.env"
    path.write_text(
        "# a comment\n"
        "\n"
        "   \n"
        "A=1\n"
        "  # an indented comment\n"
        "  B=two words  \n"
        "HOSTVAR\n"
        "C=#not a comment\n"
    )
    assert read_env_file(path) == ["A=1", "B=two words  ", "HOSTVAR", "C=#not a comment"]


def test_read_env_file_missing(tmp_path):
    with pytest.raises(UsageError, match="cannot read env file"):
        read_env_file(tmp_path / "absent.env")


def test_env_files_then_flags(tmp_path):
    first = tmp_path / "first.env"
    first.write_text("A=file1\nB=file1\n# c\nHOSTVAR\n")
    second = tmp_path / "second.env"
    second.write_text("B=file2\n")
    result = build(
        BUSYBOX,
        env_files=[first, second],
        env=["A=flag"],
        host_env={"HOSTVAR": "from-host"},
    )
    assert result["env"] == ["PATH=/bin", "A=flag", "B=file2", "HOSTVAR=from-host"]


# --- cwd, user, the rest ------------------------------------------------------------------

def test_workdir():
    assert build(NGINX)["cwd"] == "/srv"
    assert build(BUSYBOX)["cwd"] == "/"
    assert build(NGINX, workdir="/tmp")["cwd"] == "/tmp"
    assert build(BUSYBOX, workdir="/data")["cwd"] == "/data"


def test_user():
    assert build(NGINX)["user"] == "nginx"
    assert build(BUSYBOX)["user"] is None
    assert build(BUSYBOX, user="1000:1000")["user"] == "1000:1000"
    assert build(NGINX, user="root")["user"] == "root"


def test_hostname_and_stdin():
    result = build(BUSYBOX, hostname="web", interactive=True)
    assert result["hostname"] == "web"
    assert result["stdin"] is True
    default = build(BUSYBOX)
    assert default["hostname"] is None
    assert default["stdin"] is False


def test_process_keys():
    assert set(build(BUSYBOX)) == {"args", "env", "cwd", "user", "hostname", "stdin"}


# --- --memory / --cpus --------------------------------------------------------------------

@pytest.mark.parametrize("value, mib", [
    ("256m", 256),
    ("256M", 256),
    ("1g", 1024),
    ("1G", 1024),
    ("1.5g", 1536),
    ("65536k", 64),
    (str(128 << 20), 128),
    (f"{128 << 20}b", 128),
    (" 512m ", 512),
])
def test_parse_memory(value, mib):
    assert parse_memory(value) == mib


@pytest.mark.parametrize("value", ["512", "63m", "0", "1k"])
def test_parse_memory_too_small(value):
    with pytest.raises(UsageError, match="too small"):
        parse_memory(value)


@pytest.mark.parametrize("value", ["abc", "", "m", "1x", "g1", "-1g"])
def test_parse_memory_invalid(value):
    with pytest.raises(UsageError, match="invalid --memory"):
        parse_memory(value)


@pytest.mark.parametrize("value", ["inf", "nan", "1e400g"])
def test_parse_memory_non_finite_is_usage_error(value):
    # float() accepts these; they must still end as a UsageError, not a traceback.
    with pytest.raises(UsageError):
        parse_memory(value)


@pytest.mark.parametrize("value, cpus", [("1", 1), ("2", 2), ("1.5", 2), ("0.5", 1), ("0.01", 1), ("3.0", 3)])
def test_parse_cpus(value, cpus):
    assert parse_cpus(value) == cpus


@pytest.mark.parametrize("value", ["0", "-1", "0.0"])
def test_parse_cpus_not_positive(value):
    with pytest.raises(UsageError, match="greater than 0"):
        parse_cpus(value)


@pytest.mark.parametrize("value", ["two", "", "1c"])
def test_parse_cpus_invalid(value):
    with pytest.raises(UsageError, match="invalid --cpus"):
        parse_cpus(value)


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_parse_cpus_non_finite_is_usage_error(value):
    with pytest.raises(UsageError):
        parse_cpus(value)


def test_process_options_defaults_are_independent():
    a, b = ProcessOptions(), ProcessOptions()
    a.command.append("x")
    a.env.append("Y=1")
    assert b.command == [] and b.env == [] and b.env_files == []
    assert isinstance(ProcessOptions(env_files=[Path("/x")]).env_files[0], Path)
