"""kvmc's subset of Go's text/template (docker's --format), against what Go prints."""

from __future__ import annotations

import pytest

from kvmc.gotemplate import TemplateError, align, format_rows, render

INSPECT = {
    "Id": "abc123", "Name": "/web", "RestartCount": 2,
    "State": {"Status": "running", "Running": True, "ExitCode": 0, "Health": {"Status": "healthy"}},
    "Config": {"Labels": {"tier": "front", "a.b": "x"}, "Env": ["A=1", "B=2"], "Cmd": None},
    "Mounts": [{"Source": "/src", "Destination": "/app"}, {"Source": "data", "Destination": "/data"}],
    "NetworkSettings": {"Ports": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}},
}


class Row:
    """A ps context: fields and a method with an argument, as docker's containerContext."""

    ID = "abc123"
    Names = "web"

    def Label(self, name: str) -> str:  # noqa: N802 - docker's method name
        return {"tier": "front"}.get(name, "")

    def to_json(self) -> dict:
        return {"ID": self.ID, "Names": self.Names}


@pytest.mark.parametrize("fmt, out", [
    ("{{.State.Status}}", "running"),
    ("{{.Name}} {{.RestartCount}}", "/web 2"),
    ("{{.State.Running}}", "true"),
    ("{{.State.Health.Status}}", "healthy"),
    ("{{.Config.Cmd}}", "<nil>"),
    ("{{.Config.Nope}}", "<no value>"),
    ("{{.Config.Env}}", "[A=1 B=2]"),
    ("{{.Config.Labels}}", "map[a.b:x tier:front]"),
    ("{{json .Config.Labels}}", '{"tier":"front","a.b":"x"}'),
    ("{{.Config.Labels | json}}", '{"tier":"front","a.b":"x"}'),
    ('{{index .Config.Labels "a.b"}}', "x"),
    ('{{(index .NetworkSettings.Ports "80/tcp")}}', "[map[HostIp:0.0.0.0 HostPort:8080]]"),
    ('{{(index (index .NetworkSettings.Ports "80/tcp") 0).HostPort}}', "8080"),
    ('{{join .Config.Env ","}}', "A=1,B=2"),
    ("{{range .Mounts}}{{.Source}}:{{.Destination}} {{end}}", "/src:/app data:/data "),
    ("{{range .Config.Labels}}[{{.}}]{{end}}", "[x][front]"),
    ("{{range .Config.Nope}}x{{else}}none{{end}}", "none"),
    ("{{if .State.Running}}up{{else}}down{{end}}", "up"),
    ('{{if eq .State.Status "exited"}}gone{{else if eq .State.Status "running"}}on{{else}}?{{end}}', "on"),
    ('{{if and .State.Running (not .State.ExitCode)}}ok{{end}}', "ok"),
    ("{{with .State.Health}}{{.Status}}{{end}}", "healthy"),
    ("{{with .Config.Nope}}x{{else}}no{{end}}", "no"),
    ("a  {{- .Name -}}  b", "a/webb"),
    ('{{printf "%s-%d" .Name .RestartCount}}', "/web-2"),
    ("{{.Name | upper | lower}}", "/web"),
    ('{{"quoted\\tword"}} {{`raw\\t`}} {{12}} {{true}}', "quoted\tword raw\\t 12 true"),
    ("{{len .Mounts}} {{len .Config.Labels}}", "2 2"),
    ("{{/* a comment */}}ok", "ok"),
    ("{{$.Name}}{{with .State}}{{$.Name}}{{end}}", "/web/web"),
    ("{{$n := .Name}}{{$n}}", "/web"),
    ('{{split "a,b" ","}}', "[a b]"),
    ("{{title .State.Status}}", "Running"),
    ("{{truncate .Id 3}}", "abc"),
])
def test_render(fmt: str, out: str) -> None:
    assert render(fmt, INSPECT) == out


def test_methods_and_json_of_objects() -> None:
    assert render('{{.Label "tier"}} {{.ID}}', Row()) == "front abc123"
    assert render("{{json .}}", Row()) == '{"ID":"abc123","Names":"web"}'


@pytest.mark.parametrize("fmt, message", [
    ("{{.State.Status", None),  # not an action: printed as it is
    ("{{if .State.Running}}x", "has no {{end}}"),
    ("{{end}}", "unexpected {{end}}"),
    ("{{nofunc .Name}}", 'function "nofunc" not defined'),
    ("{{.Name.Nope}}", "can't evaluate field Nope"),
    ("{{.Config.Cmd.X}}", "nil pointer"),
    ('{{define "x"}}{{end}}', "not supported"),
    ("{{if .A}}1{{else}}2{{else}}3{{end}}", "more than one"),
])
def test_errors(fmt: str, message: str | None) -> None:
    if message is None:
        assert render(fmt, INSPECT) == fmt
        return
    with pytest.raises(TemplateError, match=message):
        render(fmt, INSPECT)


def test_table_aligns_as_dockers_tabwriter() -> None:
    header = {"ID": "CONTAINER ID", "Names": "NAMES", "Status": "STATUS"}
    rows = [{"ID": "abc", "Names": "web", "Status": "Up 2 seconds"}, {"ID": "abcdef123456", "Names": "db", "Status": "x"}]
    lines = format_rows("table {{.ID}}\\t{{.Status}}\\t{{.Names}}", rows, header)
    assert lines == [
        "CONTAINER ID   STATUS         NAMES",
        "abc            Up 2 seconds   web",
        "abcdef123456   x              db",
    ]
    assert format_rows("{{.Names}}", rows, header) == ["web", "db"]
    assert align(["a\tb", "ccc\td"]) == ["a         b", "ccc       d"]  # the minimum width is 10
