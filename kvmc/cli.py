"""The kvmc command line: parse flags, print, map errors to docker's exit codes. No logic.

Exit codes follow docker: the container command's own code; 125 when kvmc itself fails
(including bad flags); 126 when the command cannot be invoked; 127 when it is not found.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from kvmc.config import Config, load_config
from kvmc.errors import KvmcError
from kvmc.process import ProcessOptions, parse_cpus, parse_memory

app = typer.Typer(
    help="Run OCI container images as lightweight microVMs: one VM per container, docker's workflow.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
image_app = typer.Typer(help="Manage images in kvmc's local store.", no_args_is_help=True)
app.add_typer(image_app, name="image")

_state: dict[str, object] = {}


def _config() -> Config:
    if "config" not in _state:
        _state["config"] = load_config()
    return _state["config"]  # type: ignore[return-value]


def _runtime():  # noqa: ANN202 - imported lazily: `kvmc --help` must not need libvirt
    from kvmc.runtime import Runtime

    return Runtime(_config(), verbose=bool(_state.get("verbose")))


def _store():  # noqa: ANN202
    from kvmc.images import ImageStore

    return ImageStore(_config().images_dir)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Say what kvmc decides (accelerator, timings).")) -> None:
    _state["verbose"] = verbose


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    image: str = typer.Argument(..., help="Image name[:tag] or id from 'kvmc images'."),
    command: Optional[List[str]] = typer.Argument(None, help="Command and arguments (after the image, optionally after --)."),
    name: Optional[str] = typer.Option(None, "--name", help="Container name (default: generated)."),
    rm: bool = typer.Option(False, "--rm", help="Remove the container (VM, disk, logs) when it exits."),
    env: Optional[List[str]] = typer.Option(None, "-e", "--env", help="Set NAME=VALUE (or pass NAME from the host)."),
    env_file: Optional[List[Path]] = typer.Option(None, "--env-file", help="Read NAME=VALUE lines from a file."),
    workdir: Optional[str] = typer.Option(None, "-w", "--workdir", help="Working directory inside the container."),
    user: Optional[str] = typer.Option(None, "-u", "--user", help="user, uid, user:group or uid:gid."),
    entrypoint: Optional[str] = typer.Option(None, "--entrypoint", help="Override the image's entrypoint."),
    memory: Optional[str] = typer.Option(None, "-m", "--memory", help="VM memory, e.g. 256m or 1g."),
    cpus: Optional[str] = typer.Option(None, "--cpus", help="Number of vCPUs (fractions round up)."),
    interactive: bool = typer.Option(False, "-i", "--interactive", help="Forward stdin to the command."),
    detach: bool = typer.Option(False, "-d", "--detach", help="Run in the background and print the container id."),
    hostname: Optional[str] = typer.Option(None, "--hostname", help="Container host name (default: short id)."),
    accel: Optional[str] = typer.Option(None, "--accel", help="auto (probe, default), kvm or tcg."),
) -> None:
    """Run a command in a new container: boot a microVM whose root filesystem is the image."""
    from kvmc.runtime import RunOptions

    if detach and interactive:
        raise KvmcError("-d and -i cannot be combined yet: a detached container has no stdin")
    args = list(command or [])
    if args and args[0] == "--":
        args = args[1:]
    opts = RunOptions(
        image=image,
        process=ProcessOptions(
            command=args, entrypoint=entrypoint, env=list(env or []), env_files=list(env_file or []),
            workdir=workdir, user=user, hostname=hostname, interactive=interactive,
        ),
        name=name, auto_remove=rm, detach=detach,
        memory_mib=parse_memory(memory) if memory else None,
        cpus=parse_cpus(cpus) if cpus else None, accel=accel,
    )
    code = _runtime().run(opts, sys.stdin.buffer, sys.stdout.buffer, sys.stderr.buffer)
    raise typer.Exit(code)


@app.command("ps")
def ps(
    all_: bool = typer.Option(False, "-a", "--all", help="Show all containers (default: running only)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only show ids."),
    format_: Optional[str] = typer.Option(None, "--format", help="'json' for one JSON object per line."),
) -> None:
    """List containers."""
    rt = _runtime()
    records = [r for r in rt.state.list() if all_ or r.state == "running"]
    if quiet:
        for r in records:
            typer.echo(r.short_id)
        return
    if format_ == "json":
        for r in records:
            typer.echo(json.dumps(rt.inspect(r.id)))
        return
    typer.echo(f"{'CONTAINER ID':<14}{'IMAGE':<24}{'COMMAND':<24}{'STATUS':<18}NAMES")
    for r in records:
        cmd = " ".join(r.process["args"])
        cmd = f'"{cmd[:20]}…"' if len(cmd) > 21 else f'"{cmd}"'
        status = f"Exited ({r.exit_code})" if r.state == "exited" else r.state.capitalize()
        typer.echo(f"{r.short_id:<14}{r.image[:22]:<24}{cmd:<24}{status:<18}{r.name}")


@app.command()
def rm(
    containers: List[str] = typer.Argument(..., help="Container names or id prefixes."),
    force: bool = typer.Option(False, "-f", "--force", help="Kill a running container first."),
) -> None:
    """Remove containers: their VM, disk, sockets and logs."""
    rt = _runtime()
    failed = False
    for ref in containers:
        try:
            rt.remove(ref, force=force)
            typer.echo(ref)
        except KvmcError as exc:
            typer.echo(f"kvmc: {exc}", err=True)
            failed = True
    if failed:
        raise typer.Exit(1)


@app.command()
def inspect(containers: List[str] = typer.Argument(..., help="Container names or id prefixes.")) -> None:
    """Show containers' records as JSON."""
    rt = _runtime()
    typer.echo(json.dumps([rt.inspect(ref) for ref in containers], indent=2))


@app.command()
def logs(container: str = typer.Argument(..., help="Container name or id prefix.")) -> None:
    """Print the output a detached container has written."""
    rt = _runtime()
    record = rt.state.resolve(container)
    log = rt.state.container_dir(record.id) / "container.log"
    if not log.exists():
        return
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        stream = sys.stdout if entry["stream"] == "stdout" else sys.stderr
        stream.write(entry["log"])
    sys.stdout.flush()


@app.command()
def images(quiet: bool = typer.Option(False, "-q", "--quiet", help="Only show ids.")) -> None:
    """List images in the local store."""
    found = _store().list()
    if quiet:
        for img in found:
            typer.echo(img.short_id)
        return
    typer.echo(f"{'REPOSITORY:TAG':<36}{'IMAGE ID':<14}{'SIZE':>10}")
    for img in found:
        for tag in img.tags or ["<none>"]:
            typer.echo(f"{tag:<36}{img.short_id:<14}{img.size / 1e6:>8.1f}MB")


@app.command()
def pull(ref: str = typer.Argument(..., help="Registry reference, e.g. alpine or quay.io/x/y:tag.")) -> None:
    """Pull an image from a registry with skopeo (needs network access to the registry)."""
    img = _store().pull(ref)
    typer.echo(f"{img.tags[0] if img.tags else ref}: {img.id}")


@app.command()
def rmi(
    refs: List[str] = typer.Argument(..., help="Image names or ids."),
    force: bool = typer.Option(False, "-f", "--force", help="Remove an id with several tags."),
) -> None:
    """Remove images (untag; delete the disk when no tag remains)."""
    rt = _runtime()
    for ref in refs:
        rt.check_image_unused(ref)
        result = rt.images.remove(ref, force=force)
        for tag in result.untagged:
            typer.echo(f"Untagged: {tag}")
        if result.deleted:
            typer.echo(f"Deleted: sha256:{result.deleted}")


@image_app.command("import")
def image_import(
    path: Path = typer.Argument(..., help="OCI image layout directory or 'docker save' tarball."),
    name: Optional[str] = typer.Option(None, "--name", "-t", help="name:tag for the image."),
) -> None:
    """Import an image from an OCI layout directory or a docker-save tarball."""
    img = _store().import_path(path, name)
    typer.echo(f"{', '.join(img.tags)}: {img.id}")


@image_app.command("build-default")
def image_build_default(name: str = typer.Option("kvmc/busybox:latest", "--name", "-t", help="name:tag.")) -> None:
    """Build kvmc's default image locally from the host's busybox-static (no registry needed)."""
    from kvmc.images import build_busybox_image

    img = build_busybox_image(_store(), name)
    typer.echo(f"{name}: {img.id}")


@image_app.command("ls")
def image_ls(quiet: bool = typer.Option(False, "-q", "--quiet")) -> None:
    """List images (same as 'kvmc images')."""
    images(quiet)


@image_app.command("rm")
def image_rm(refs: List[str] = typer.Argument(...), force: bool = typer.Option(False, "-f", "--force")) -> None:
    """Remove images (same as 'kvmc rmi')."""
    rmi(refs, force)


@app.command()
def info() -> None:
    """Show the host setup: libvirt, guest kernel, and the accelerator kvmc will use."""
    rt = _runtime()
    guest = rt.guest()
    choice = rt.accel()
    typer.echo(f"data dir:     {rt.config.data_dir}")
    typer.echo(f"libvirt:      {rt.config.libvirt_uri}")
    typer.echo(f"guest kernel: {guest.kernel} ({guest.kernel_release})")
    typer.echo(f"accelerator:  {choice.accel} ({choice.reason})")


def main() -> None:
    """Console entry point: run the app, turning every failure into docker's exit codes."""
    try:
        code = app(standalone_mode=False)  # returns the code of a typer.Exit raised by a command
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as exc:  # bad flags or arguments: docker exits 125 for these
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"kvmc: {exc}", file=sys.stderr)
        sys.exit(125)
    except KvmcError as exc:
        print(f"kvmc: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
