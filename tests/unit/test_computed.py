"""Computed files: jinja2 templates and generator programs rendered per host, with
real files and real subprocesses."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from dominator.herd.computed import (
    MAX_OUTPUT_BYTES,
    ComputedFileError,
    Renderer,
    content_key,
    render_image_files,
)
from fleetlib.errors import FleetError
from fleetlib.fstree.image import ComputedFile, Image
from fleetlib.fstree.tree import TreeBuilder, regular


@dataclasses.dataclass(frozen=True)
class Host:
    """The shape of mdb.machine.Machine."""

    hostname: str
    address: str = ""
    required_image: str = ""
    planned_image: str = ""
    disable_updates: bool = False
    owner_group: str = ""
    tags: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Dominator's MDB JSON."""
        return {
            "Hostname": self.hostname, "IpAddress": self.address,
            "RequiredImage": self.required_image, "PlannedImage": self.planned_image,
            "DisableUpdates": self.disable_updates, "OwnerGroup": self.owner_group,
            "Tags": dict(self.tags),
        }


WEB1 = Host("web1", "10.0.0.1", "base/1", "base/2", owner_group="web", tags={"rack": "r1"})
WEB2 = Host("web2", "10.0.0.2", "base/1", tags={"rack": "r2"})


def write(directory: Path, name: str, text: str, executable: bool = False) -> Path:
    """Write a generator file, making it a program when `executable`."""
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755 if executable else 0o644)
    return path


@pytest.fixture
def gen(tmp_path: Path) -> Path:
    """An empty generator directory."""
    directory = tmp_path / "generators"
    directory.mkdir()
    return directory


def test_template_differs_per_host_and_follows_the_record(gen: Path) -> None:
    write(gen, "motd.j2", "{{ hostname }} {{ address }} rack={{ tags.rack }} "
                          "image={{ required_image }} next={{ machine.PlannedImage }}\n")
    renderer = Renderer(gen)
    assert renderer.render("motd.j2", WEB1) == b"web1 10.0.0.1 rack=r1 image=base/1 next=base/2\n"
    assert renderer.render("motd.j2", WEB2) == b"web2 10.0.0.2 rack=r2 image=base/1 next=\n"
    moved = dataclasses.replace(WEB1, tags={"rack": "r9"})
    assert renderer.render("motd.j2", moved) == b"web1 10.0.0.1 rack=r9 image=base/1 next=base/2\n"


def test_template_sees_every_field_and_keeps_utf8(gen: Path) -> None:
    write(gen, "all.j2", "{{ owner_group }} {{ disable_updates }} {{ planned_image }} "
                         "{{ tags | dictsort }} {{ machine.Hostname }} é")
    assert Renderer(gen).render("all.j2", WEB1) == \
        "web False base/2 [('rack', 'r1')] web1 é".encode()


def test_template_change_on_disk_is_picked_up(gen: Path) -> None:
    template = write(gen, "motd.j2", "old {{ hostname }}\n")
    renderer = Renderer(gen)
    assert renderer.render("motd.j2", WEB1) == b"old web1\n"
    template.write_text("new {{ hostname }}\n")
    later = time.time() + 5
    os.utime(template, (later, later))
    assert renderer.render("motd.j2", WEB1) == b"new web1\n"


def test_include_of_another_template(gen: Path) -> None:
    write(gen, "common/header.j2", "# managed for {{ hostname }}\n")
    write(gen, "hosts.j2", '{% include "common/header.j2" %}127.0.0.1 {{ hostname }}\n')
    assert Renderer(gen).render("hosts.j2", WEB2) == b"# managed for web2\n127.0.0.1 web2\n"


def test_undefined_variable_names_template_line_and_host(gen: Path) -> None:
    write(gen, "bad.j2", "line one\n{{ nosuch }}\n")
    with pytest.raises(ComputedFileError) as caught:
        Renderer(gen).render("bad.j2", WEB1)
    message = str(caught.value)
    assert "web1" in message and "bad.j2 line 2" in message and "nosuch" in message
    assert "\n" not in message
    assert isinstance(caught.value, FleetError)


def test_undefined_in_included_template_names_that_template(gen: Path) -> None:
    write(gen, "part.j2", "ok\n{{ tags.nosuch }}\n")
    write(gen, "main.j2", '{% include "part.j2" %}')
    with pytest.raises(ComputedFileError, match=r"part\.j2 line 2.*nosuch"):
        Renderer(gen).render("main.j2", WEB1)


def test_syntax_error_names_line(gen: Path) -> None:
    write(gen, "syntax.j2", "a\nb\n{% if %}\n{% endif %}\n")
    with pytest.raises(ComputedFileError, match=r"host web1: .*syntax\.j2 line 3"):
        Renderer(gen).render("syntax.j2", WEB1)


def test_python_errors_in_template_are_computed_file_errors(gen: Path) -> None:
    write(gen, "div.j2", "{{ 1 // 0 }}")
    with pytest.raises(ComputedFileError, match="ZeroDivisionError"):
        Renderer(gen).render("div.j2", WEB1)


@pytest.mark.parametrize("expression", [
    "''.__class__.__mro__",
    "hostname.__class__.__base__.__subclasses__()",
    "cycler.__init__.__globals__",
    "tags.update({'rack': 'hacked'})",
])
def test_sandbox_blocks_escapes_and_mutation(gen: Path, expression: str) -> None:
    write(gen, "evil.j2", "{{ " + expression + " }}")
    host = Host("web1", tags={"rack": "r1"})
    with pytest.raises(ComputedFileError, match=r"web1.*evil\.j2 line 1.*(unsafe|undefined)"):
        Renderer(gen).render("evil.j2", host)
    assert host.tags == {"rack": "r1"}


PROGRAM = """#!/bin/sh
printf 'cwd=%s\\n' "$(pwd)"
printf 'secret=%s\\n' "${COMPUTED_TEST_SECRET:-unset}"
sed -n 's/.*"Hostname": "\\([^"]*\\)".*/host=\\1/p'
"""


def test_program_gets_json_on_stdin(
    gen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMPUTED_TEST_SECRET", "leaked")
    write(gen, "hostname.sh", PROGRAM, executable=True)
    renderer = Renderer(gen)
    lines = renderer.render("hostname.sh", WEB2).decode().splitlines()
    assert lines == [f"cwd={gen.resolve()}", "secret=unset", "host=web2"]
    write(gen, "echo.sh", "#!/bin/sh\ncat\n", executable=True)
    assert json.loads(renderer.render("echo.sh", WEB1)) == WEB1.to_json()


def test_program_that_ignores_a_large_input(gen: Path) -> None:
    write(gen, "fixed.sh", "#!/bin/sh\necho fixed\n", executable=True)
    host = Host("big", tags={f"k{i}": "v" * 100 for i in range(5000)})
    assert Renderer(gen).render("fixed.sh", host) == b"fixed\n"


def test_failing_program_reports_first_stderr_line(gen: Path) -> None:
    write(gen, "fail.sh", "#!/bin/sh\necho partial\necho 'no rack for this host' >&2\n"
                          "echo 'second line' >&2\nexit 3\n", executable=True)
    with pytest.raises(ComputedFileError) as caught:
        Renderer(gen).render("fail.sh", WEB1)
    message = str(caught.value)
    assert "web1" in message and "fail.sh" in message and "status 3" in message
    assert "no rack for this host" in message and "second line" not in message


def test_slow_program_times_out_and_is_killed(gen: Path) -> None:
    write(gen, "slow.sh", "#!/bin/sh\necho waiting >&2\nsleep 5\necho done\n", executable=True)
    started = time.monotonic()
    with pytest.raises(ComputedFileError, match=r"timed out after 0\.5s: waiting"):
        Renderer(gen, timeout=0.5).render("slow.sh", WEB1)
    assert time.monotonic() - started < 3


def test_program_output_is_bounded(gen: Path) -> None:
    write(gen, "huge.sh", f"#!/bin/sh\nhead -c {MAX_OUTPUT_BYTES + 1} /dev/zero\n",
          executable=True)
    with pytest.raises(ComputedFileError, match="output exceeds 16 MiB"):
        Renderer(gen).render("huge.sh", WEB1)
    write(gen, "full.sh", f"#!/bin/sh\nhead -c {MAX_OUTPUT_BYTES} /dev/zero\n", executable=True)
    assert len(Renderer(gen).render("full.sh", WEB1)) == MAX_OUTPUT_BYTES


@pytest.mark.parametrize("name", ["../secret", "/etc/passwd", "sub/../../secret", "./motd.j2",
                                  "sub//x", "", "link", "sub/link-dir/secret"])
def test_generator_names_cannot_escape(gen: Path, name: str) -> None:
    (gen.parent / "secret").write_text("top secret\n")
    write(gen, "motd.j2", "x")
    (gen / "sub").mkdir()
    (gen / "link").symlink_to(gen.parent / "secret")
    (gen / "sub" / "link-dir").symlink_to(gen.parent)
    with pytest.raises(ComputedFileError, match="web1"):
        Renderer(gen).render(name, WEB1)


def test_include_cannot_escape_through_symlink(gen: Path) -> None:
    (gen.parent / "secret").write_text("top secret\n")
    (gen / "link").symlink_to(gen.parent / "secret")
    write(gen, "leak.j2", '{% include "link" %}')
    with pytest.raises(ComputedFileError, match="outside the generator directory"):
        Renderer(gen).render("leak.j2", WEB1)
    write(gen, "dotdot.j2", '{% include "../secret" %}')
    with pytest.raises(ComputedFileError, match="not found"):
        Renderer(gen).render("dotdot.j2", WEB1)


def test_symlink_inside_the_directory_is_allowed(gen: Path) -> None:
    write(gen, "real.j2", "{{ hostname }}")
    (gen / "alias.j2").symlink_to("real.j2")
    assert Renderer(gen).render("alias.j2", WEB1) == b"web1"


def test_missing_generator_and_directory(gen: Path, tmp_path: Path) -> None:
    with pytest.raises(ComputedFileError, match="no such generator"):
        Renderer(gen).render("nope.j2", WEB1)
    with pytest.raises(ComputedFileError, match="no generator directory"):
        Renderer(None).render("motd.j2", WEB1)
    with pytest.raises(FleetError, match="not a directory"):
        Renderer(tmp_path / "absent")


def image_with(computed: list[ComputedFile]) -> Image:
    """An image holding a regular file at every computed path, plus one plain file."""
    builder = TreeBuilder()
    builder.add("/bin/sh", regular(0o755, 0, 0, 0, 3, b"\x01" * 32))
    for item in computed:
        builder.add(item.path, regular(0o644, 0, 0, 0, 0, b""))
    return Image("base/1", builder.tree, None, computed_files=computed)


def test_render_image_files_renders_every_computed_path(gen: Path) -> None:
    write(gen, "motd.j2", "welcome to {{ hostname }}\n")
    write(gen, "hostname.sh", "#!/bin/sh\nsed -n 's/.*\"Hostname\": \"\\([^\"]*\\)\".*/\\1/p'\n",
          executable=True)
    image = image_with([ComputedFile("/etc/motd", "motd.j2"),
                        ComputedFile("/etc/hostname", "hostname.sh")])
    renderer = Renderer(gen)
    assert render_image_files(image, WEB1, renderer) == {
        "/etc/motd": b"welcome to web1\n", "/etc/hostname": b"web1\n"}
    assert render_image_files(image, WEB2, renderer)["/etc/hostname"] == b"web2\n"
    assert render_image_files(image_with([]), WEB1, renderer) == {}


def test_one_host_failing_leaves_others_alone(gen: Path) -> None:
    write(gen, "rack.j2", "rack {{ tags.rack }}\n")
    image = image_with([ComputedFile("/etc/rack", "rack.j2")])
    renderer = Renderer(gen)
    with pytest.raises(ComputedFileError) as caught:
        render_image_files(image, Host("orphan"), renderer)
    assert caught.value.hostname == "orphan" and caught.value.path == "/etc/rack"
    assert str(caught.value).startswith("host orphan: computed file /etc/rack ")
    assert render_image_files(image, WEB1, renderer) == {"/etc/rack": b"rack r1\n"}


def test_content_key_is_stable_and_sensitive() -> None:
    files = {"/etc/motd": b"hello\n", "/etc/hostname": b"web1\n"}
    key = content_key(files)
    assert len(key) == 16
    assert content_key(dict(reversed(list(files.items())))) == key
    assert content_key(dict(files)) == key
    variants = [
        {**files, "/etc/motd": b"hellp\n"},
        {**files, "/etc/motd": b"hello\n\0"},
        {"/etc/motD": b"hello\n", "/etc/hostname": b"web1\n"},
        {**files, "/etc/empty": b""},
        {"/etc/motd": b"hello\n"},
        {},
    ]
    keys = {content_key(variant) for variant in variants}
    assert len(keys) == len(variants) and key not in keys
