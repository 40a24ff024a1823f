"""Every command's --help renders: the first thing a new user asks (issue 15: `run --help`
crashed on the -p help text read as rich markup)."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from kvmc.cli import app


def _commands(command: object, path: list[str]) -> list[list[str]]:
    found = [path]
    for name, sub in getattr(command, "commands", {}).items():
        found += _commands(sub, [*path, name])
    return found


def test_every_command_and_subcommand_renders_its_help() -> None:
    runner = CliRunner()
    paths = _commands(typer.main.get_command(app), [])
    assert len(paths) > 30 and ["serve"] in paths and ["run"] in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, f"kvmc {' '.join(path)} --help: {result.exception!r}\n{result.output}"
        assert "Usage" in result.output


def test_the_publish_help_keeps_its_brackets() -> None:
    result = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    assert "[HOSTIP:][HOSTPORT:]PORT[/tcp|udp]" in result.output


def test_the_invoked_command_alone_parses_as_in_the_full_app() -> None:
    """main() builds only the command named on the command line (kvmc.cli._app_for): each
    top-level command and group keeps exactly the parameters and subcommands it has in the
    full app; no command, a flag first or an unknown name get the full app."""
    from kvmc.cli import _app_for

    full = typer.main.get_command(app)
    for name, command in full.commands.items():
        for argv in ([name, "x"], ["-v", name], ["--verbose", name, "--help"]):
            slim = typer.main.get_command(_app_for(argv))
            assert list(slim.commands) == [name]
            assert [p.opts for p in slim.commands[name].params] == [p.opts for p in command.params]
            assert sorted(getattr(slim.commands[name], "commands", {})) == sorted(getattr(command, "commands", {}))
            assert [p.opts for p in slim.params] == [p.opts for p in full.params]
    for argv in ([], ["--help"], ["-v"], ["no-such-command"]):
        assert _app_for(argv) is app
