"""Tests of fstree.filter (Dominator filter lines, prune) and fstree.triggers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fleetlib.errors import FleetError
from fleetlib.fstree.filter import EMPTY, Filter, is_filtered, prune
from fleetlib.fstree.tree import Inode, Tree, TreeBuilder, directory, regular
from fleetlib.fstree.triggers import Trigger, fired, load_triggers, make_trigger, parse_triggers


def reg(data: bytes) -> Inode:
    return regular(0o644, 0, 0, 1, len(data), hashlib.sha256(data).digest())


# ---------------------------------------------------------------- filter matching


def test_filter_is_anchored_at_the_start_only() -> None:
    flt = Filter.from_lines(["/etc/fstab", "/var/log/.*"])
    assert flt.matches("/etc/fstab")
    assert flt.matches("/etc/fstab.bak")  # not anchored at the end
    assert not flt.matches("/x/etc/fstab")  # anchored at the start
    assert not flt.matches("/etc")
    assert flt.matches("/var/log/syslog")
    assert not flt.matches("/var/log")
    assert not flt.inverted


def test_filter_alternation_inside_a_line_stays_anchored() -> None:
    flt = Filter.from_lines(["/a|/b"])
    assert flt.matches("/a/x") and flt.matches("/b")
    assert not flt.matches("/c/b")


def test_filter_inversion() -> None:
    flt = Filter.from_lines(["!", "/etc/ssh"])
    assert flt.inverted
    assert not flt.matches("/etc/ssh/sshd_config")  # owned: only what the lines name
    assert flt.matches("/etc")
    assert flt.matches("/usr/bin/ls")
    assert flt.lines == ("!", "/etc/ssh")
    everything = Filter.from_lines(["!"])
    assert everything.matches("/anything")


def test_filter_blank_lines_ignored_and_lines_kept() -> None:
    flt = Filter.from_lines(["", "  ", "/tmp\r\n", "\t", "/proc"])
    assert flt.lines == ("/tmp", "/proc")
    assert flt.matches("/tmp/x") and flt.matches("/proc/1")
    assert not flt.matches("/")
    assert Filter.from_lines(["", "   "]) == EMPTY
    assert not EMPTY.matches("/etc")


def test_filter_invalid_regex_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match=r"line 3: invalid regex '/a\('"):
        Filter.from_lines(["/ok", "", "/a("])
    path = tmp_path / "filter"
    path.write_text("/proc\n/sys\n[unclosed\n")
    with pytest.raises(FleetError, match=rf"{path} line 3"):
        Filter.load(path)
    with pytest.raises(FleetError, match="cannot read filter"):
        Filter.load(tmp_path / "missing")


def test_filter_load(tmp_path: Path) -> None:
    path = tmp_path / "filter"
    path.write_bytes(b"/tmp\n\n/caf\xe9\n")
    flt = Filter.load(path)
    assert flt.matches("/tmp/x")
    assert flt.matches("/caf\udce9")  # a non-UTF-8 line matches the same bytes


@pytest.mark.parametrize("lines", [["(?i)/tmp"], ["/a", "(?s)/b"],
                                   ["(?P<x>/a)", "(?P<x>/b)"]])
def test_filter_lines_valid_alone_compile_together(lines: list[str]) -> None:
    try:
        flt = Filter.from_lines(lines)
    except FleetError:
        return  # a clear refusal would be acceptable too
    assert flt.matches("/a" if "/a" in lines[0] else "/tmp")


def test_is_filtered() -> None:
    flt = Filter.from_lines(["/tmp"])
    assert is_filtered(flt, "/tmp/x")
    assert not is_filtered(flt, "/etc")
    assert not is_filtered(None, "/tmp/x")  # sparse: nothing filtered
    assert not is_filtered(EMPTY, "/tmp/x")


# ---------------------------------------------------------------- prune


def sample_tree() -> Tree:
    builder = TreeBuilder()
    for path in ("/etc/passwd", "/etc/ssh/key", "/tmp/a", "/tmp/b/c", "/var/log/x",
                 "/var/lib/db"):
        builder.add(path, reg(path.encode()))
    builder.add("/etc", directory(0o700, 0, 0))
    link = builder.add("/etc/ssh/key2", reg(b"shared"))
    builder.add("/etc/ssh/key3", reg(b"shared"), link)
    return builder.tree


def test_prune_drops_whole_filtered_subtrees() -> None:
    tree = sample_tree()
    pruned = prune(tree, Filter.from_lines(["/tmp", "/var/log/"]))
    assert set(pruned.paths()) == {"/", "/etc", "/etc/passwd", "/etc/ssh", "/etc/ssh/key",
                                   "/etc/ssh/key2", "/etc/ssh/key3", "/var", "/var/log",
                                   "/var/lib", "/var/lib/db"}
    gone = {tree.lookup(p) for p in ("/tmp", "/tmp/a", "/tmp/b", "/tmp/b/c", "/var/log/x")}
    assert not gone & set(pruned.inodes)
    assert not gone & set(pruned.children)
    assert set(tree.paths()) > set(pruned.paths())  # the input is not changed


def test_prune_keeps_filtered_parents_of_kept_paths() -> None:
    tree = sample_tree()
    pruned = prune(tree, Filter.from_lines(["!", "/etc/ssh/"]))
    assert set(pruned.paths()) == {"/", "/etc", "/etc/ssh", "/etc/ssh/key", "/etc/ssh/key2",
                                   "/etc/ssh/key3"}
    # the bare parent keeps its own metadata
    assert pruned.inodes[pruned.lookup("/etc")] == directory(0o700, 0, 0)
    # hard links among kept paths are preserved
    assert pruned.lookup("/etc/ssh/key2") == pruned.lookup("/etc/ssh/key3")
    assert pruned.link_counts()[pruned.lookup("/etc/ssh/key2")] == 2
    # a filter that matches a parent exactly keeps it for its children
    exact = prune(tree, Filter.from_lines(["/etc$", "/var"]))
    assert set(exact.paths()) == {"/", "/etc", "/etc/passwd", "/etc/ssh", "/etc/ssh/key",
                                  "/etc/ssh/key2", "/etc/ssh/key3", "/tmp", "/tmp/a",
                                  "/tmp/b", "/tmp/b/c"}


def test_prune_none_and_empty_prune_nothing() -> None:
    tree = sample_tree()
    assert prune(tree, None).fingerprint() == tree.fingerprint()
    assert prune(tree, EMPTY).fingerprint() == tree.fingerprint()
    assert prune(tree, Filter.from_lines(["/nowhere"])).fingerprint() == tree.fingerprint()
    only_root = prune(tree, Filter.from_lines(["!"]))
    assert list(only_root.paths()) == ["/"]


# ---------------------------------------------------------------- triggers


TRIGGERS = """# triggers for the web tier
[
  {"MatchLines": ["/etc/nginx/.*", "/usr/sbin/nginx"], "Service": "nginx",
   "DoReload": true},
    # an indented comment
  {"MatchLines": ["/etc/ssh/"], "Service": "ssh", "HighImpact": true},
  {"MatchLines": ["/boot/"], "Service": "reboot@host.target", "DoReboot": true,
   "DoReload": false, "HighImpact": false}
]
"""


def test_parse_triggers_with_comments() -> None:
    triggers = parse_triggers(TRIGGERS)
    assert [t.service for t in triggers] == ["nginx", "ssh", "reboot@host.target"]
    nginx, ssh, boot = triggers
    assert nginx.do_reload and not nginx.do_reboot and not nginx.high_impact
    assert ssh.high_impact and not ssh.do_reload
    assert boot.do_reboot
    assert nginx.match_lines == ("/etc/nginx/.*", "/usr/sbin/nginx")
    assert nginx.matches("/etc/nginx/nginx.conf")
    assert nginx.matches("/usr/sbin/nginx")
    assert not nginx.matches("/x/etc/nginx/a")  # anchored at the start
    assert ssh.matches("/etc/ssh/sshd_config") and not ssh.matches("/etc/sshd")
    assert nginx.to_json() == {"MatchLines": ["/etc/nginx/.*", "/usr/sbin/nginx"],
                               "Service": "nginx", "DoReload": True, "DoReboot": False,
                               "HighImpact": False}
    assert parse_triggers(json.dumps([t.to_json() for t in triggers])) == triggers


def test_parse_empty_triggers() -> None:
    assert parse_triggers("") == []
    assert parse_triggers("# nothing\n") == []
    assert parse_triggers("[]") == []


def test_load_triggers(tmp_path: Path) -> None:
    path = tmp_path / "triggers.json"
    path.write_text(TRIGGERS)
    assert len(load_triggers(path)) == 3
    path.write_text("{")
    with pytest.raises(FleetError, match=str(path)):
        load_triggers(path)
    with pytest.raises(FleetError):
        load_triggers(tmp_path / "missing.json")
    path.write_bytes(b'[{"MatchLines": ["/\xff"], "Service": "x"}]')
    with pytest.raises(FleetError):
        load_triggers(path)


@pytest.mark.parametrize("text", [
    "not json",
    "[",
    '{"MatchLines": ["/etc"], "Service": "x"}',  # not an array
    '"x"',
    "[1]",
    '[["/etc"]]',
    '[{"MatchLines": ["/etc"], "Service": "x", "Restart": true}]',  # unknown field
    '[{"MatchLines": "/etc", "Service": "x"}]',  # wrong type
    '[{"MatchLines": [1], "Service": "x"}]',
    '[{"MatchLines": ["/etc"], "Service": 1}]',
    '[{"MatchLines": ["/etc"], "Service": "x", "DoReload": 1}]',
    '[{"MatchLines": ["/etc"], "Service": "x", "HighImpact": "yes"}]',
    '[{"MatchLines": ["/etc"], "Service": "x", "DoReboot": null}]',
    '[{"MatchLines": ["/etc("], "Service": "x"}]',  # bad regex
    '[{"MatchLines": ["/etc"], "Service": "x; rm -rf /"}]',  # bad service name
    '[{"MatchLines": ["/etc"], "Service": ""}]',
    '[{"MatchLines": ["/etc"], "Service": "a b"}]',
    '[{"MatchLines": ["/etc"], "Service": "../x"}]',
    '[{"MatchLines": ["/etc"]}]',  # missing Service
    '[{"Service": "x"}]',  # no MatchLines
    '[{"MatchLines": [], "Service": "x"}]',
])
def test_malformed_triggers(text: str) -> None:
    with pytest.raises(FleetError):
        parse_triggers(text, origin="tfile")


def test_trigger_inline_flags() -> None:
    try:
        triggers = parse_triggers('[{"MatchLines": ["(?i)/etc/NGINX"], "Service": "nginx"}]')
    except FleetError:
        return
    assert triggers[0].matches("/etc/nginx/x")


def test_make_trigger_validates() -> None:
    trigger = make_trigger(["/a", "/b"], "svc")
    assert trigger.matches("/b/c") and not trigger.matches("/c")
    with pytest.raises(FleetError):
        make_trigger([], "svc")
    with pytest.raises(FleetError):
        make_trigger(["/a"], "svc x")
    assert not Trigger(("/a",), "svc").matches("/a")  # uncompiled default matches nothing


def test_service_name_with_trailing_newline_refused() -> None:
    with pytest.raises(FleetError):
        parse_triggers('[{"MatchLines": ["/etc"], "Service": "nginx\\n"}]')


def test_fired_in_rule_order_once_each() -> None:
    triggers = parse_triggers(TRIGGERS)
    nginx, ssh, boot = triggers
    paths = ["/boot/vmlinuz", "/etc/ssh/a", "/etc/nginx/a", "/etc/nginx/b", "/boot/initrd",
             "/etc/unrelated"]
    assert fired(triggers, paths) == [nginx, ssh, boot]
    assert fired(triggers, ["/etc/ssh/x", "/etc/ssh/y"]) == [ssh]
    assert fired(triggers, []) == []
    assert fired(triggers, ["/nothing"]) == []
    assert fired(reversed(triggers), paths) == [boot, ssh, nginx]
    assert fired(iter(triggers), iter(paths)) == [nginx, ssh, boot]  # iterables
