"""`dominator image ...`: add, list, show, diff, get and delete images."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

from dominator.cli.options import imageserver_option, json_option
from fleetlib.cli.display import echo_json, format_bytes, progress_bar
from fleetlib.cli.options import parse_duration, security_options
from fleetlib.errors import FleetError
from fleetlib.fstree.diff import Change, diff_trees
from fleetlib.fstree.filter import EMPTY, Filter, prune
from fleetlib.fstree.image import Image, check_image_name, parse_computed_files
from fleetlib.fstree.listing import format_inode, listing
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.source import open_source
from fleetlib.fstree.triggers import load_triggers
from fleetlib.fstree.unpack import check_empty_destination, unpack_tree
from fleetlib.rpc.tls import Security
from imageserver.client import ImageServerClient

GET_SCRATCH = ".image-get.tmp"


@click.group(name="image")
def image() -> None:
    """Images: immutable trees (plus filter, triggers, computed files) on the image server."""


@image.command(name="add")
@click.argument("name")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--filter", "filter_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Filter file: one start-anchored regex per line; matched paths are left "
                   "out of the image and never touched on hosts.")
@click.option("--sparse", is_flag=True,
              help="No filter at all: the image adds and changes files but never deletes.")
@click.option("--triggers", "triggers_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Triggers JSON (Dominator format): services to restart on changes.")
@click.option("--computed-files", "computed_file", type=click.Path(dir_okay=False, path_type=Path),
              help='Computed files JSON: [{"Filename": "/etc/x", "Source": "generator"}].')
@click.option("--expires-in", help="Delete the image automatically after this long (e.g. 7d).")
@json_option
@imageserver_option
@security_options
def add_command(name: str, source: Path, filter_file: Path | None, sparse: bool,
                triggers_file: Path | None, computed_file: Path | None, expires_in: str | None,
                as_json: bool, imageserver: str, security: Security) -> None:
    """Add image NAME from SOURCE: a directory, or a .tar, .tar.gz or .tar.zst file.

    Only the objects the server lacks are uploaded, over several streams.
    """
    check_image_name(name)
    if sparse and filter_file:
        raise FleetError("--sparse and --filter exclude each other")
    flt = None if sparse else Filter.load(filter_file) if filter_file else EMPTY
    triggers = load_triggers(triggers_file) if triggers_file else []
    computed = parse_computed_files(computed_file.read_text(), str(computed_file)) \
        if computed_file else []
    expires = int(time.time()) + parse_duration(expires_in) if expires_in else 0
    with ImageServerClient(imageserver, security) as client:
        if client.image_exists(name):
            raise FleetError(f"image {name} already exists (images are immutable)")
        started = time.monotonic()
        src = open_source(source)
        tree = prune(src.tree, flt)
        wanted = tree.object_sizes()
        missing = client.missing(wanted)
        with progress_bar(sum(missing.values()), f"uploading {len(missing)} objects") as advance:
            client.upload(src, missing, advance)
        client.add_image(Image(name, tree, flt, triggers, computed, expires_unix=expires))
    report: dict[str, Any] = {
        "image": name, "inodes": len(tree.inodes), "bytes": tree.total_bytes(),
        "uploaded_objects": len(missing), "uploaded_bytes": sum(missing.values()),
        "skipped_objects": len(wanted) - len(missing),
        "skipped_bytes": sum(wanted.values()) - sum(missing.values()),
        "seconds": round(time.monotonic() - started, 3),
    }
    if as_json:
        echo_json(report)
        return
    click.echo(f"added image {name}: {report['inodes']} inodes, "
               f"{format_bytes(report['bytes'])} in {report['seconds']} s")
    click.echo(f"uploaded {report['uploaded_objects']} objects "
               f"({format_bytes(report['uploaded_bytes'])}), skipped "
               f"{report['skipped_objects']} the server already had "
               f"({format_bytes(report['skipped_bytes'])})")


@image.command(name="list")
@click.option("--prefix", default="", help="Only images whose names start with this.")
@json_option
@imageserver_option
@security_options
def list_command(prefix: str, as_json: bool, imageserver: str, security: Security) -> None:
    """List images on the image server."""
    with ImageServerClient(imageserver, security) as client:
        images = client.list_images(prefix)
    if as_json:
        echo_json([{"name": i.name, "created": i.created_unix, "expires": i.expires_unix,
                    "inodes": i.inodes, "bytes": i.total_bytes} for i in images])
        return
    for info in images:
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(info.created_unix))
        expires = "" if not info.expires_unix else \
            " expires " + time.strftime("%Y-%m-%d %H:%M", time.gmtime(info.expires_unix))
        click.echo(f"{info.name}\t{created}\t{info.inodes} inodes\t"
                   f"{format_bytes(info.total_bytes)}{expires}")


@image.command(name="show")
@click.argument("name")
@click.option("--hashes", is_flag=True, help="Add each file's sha256.")
@json_option
@imageserver_option
@security_options
def show_command(name: str, hashes: bool, as_json: bool, imageserver: str,
                 security: Security) -> None:
    """List image NAME like `ls -l`: mode, links, uid, gid, size, mtime, path."""
    with ImageServerClient(imageserver, security) as client:
        img = client.get_image(name)
    if as_json:
        echo_json({
            "name": img.name, "created": img.created_unix, "expires": img.expires_unix,
            "filter": None if img.filter is None else list(img.filter.lines),
            "triggers": [t.to_json() for t in img.triggers],
            "computed_files": [{"Filename": c.path, "Source": c.source}
                               for c in img.computed_files],
            "listing": list(listing(img.tree, hashes=True)),
        })
        return
    for line in listing(img.tree, hashes):
        click.echo(line)


@image.command(name="diff")
@click.argument("first")
@click.argument("second")
@imageserver_option
@security_options
def diff_command(first: str, second: str, imageserver: str, security: Security) -> None:
    """Compare images FIRST and SECOND: what turning FIRST into SECOND changes.

    Lines: `+` added, `-` deleted, `M` content or kind differs, `m` only owner,
    mode, mtime or extended attributes differ. Exit 0 when the same, 1 when not.
    """
    with ImageServerClient(imageserver, security) as client:
        old, new = client.get_image(first), client.get_image(second)
    changes = diff_trees(old.tree, new.tree, EMPTY)
    for entry in sorted(changes.entries, key=lambda e: e.path):
        inode = entry.new if entry.new is not None else entry.old
        assert inode is not None
        suffix = f" (link to {entry.link_to})" if entry.link_to else ""
        click.echo(f"{entry.change.value} {format_inode(entry.path, inode)}{suffix}")
        if entry.change in (Change.REPLACE, Change.METADATA) and entry.old is not None:
            click.echo(f"  was {format_inode(entry.path, entry.old)}")
    sys.exit(1 if changes else 0)


@image.command(name="get")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@imageserver_option
@security_options
def get_command(name: str, directory: Path, imageserver: str, security: Security) -> None:
    """Unpack image NAME into DIRECTORY (missing or empty) exactly: owners, modes,
    mtimes, extended attributes, hard links, symlinks and device nodes."""
    check_empty_destination(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scratch = ObjectStore(directory / GET_SCRATCH, scratch=True)
    try:
        with ImageServerClient(imageserver, security) as client:
            img = client.get_image(name)
            sizes = img.tree.object_sizes()
            with progress_bar(sum(sizes.values()), f"fetching {len(sizes)} objects") as advance:
                client.fetch(list(sizes), scratch, advance)
        problems = unpack_tree(img.tree, directory, scratch)
    finally:
        shutil.rmtree(scratch.root, ignore_errors=True)
    for problem in problems[:20]:
        click.echo(f"warning: {problem}", err=True)
    if len(problems) > 20:
        click.echo(f"warning: ... and {len(problems) - 20} more", err=True)
    click.echo(f"unpacked image {name} into {directory}: {len(img.tree.inodes)} inodes, "
               f"{format_bytes(img.tree.total_bytes())}")


@image.command(name="delete")
@click.argument("name")
@imageserver_option
@security_options
def delete_command(name: str, imageserver: str, security: Security) -> None:
    """Delete image NAME; objects no other image uses are freed."""
    with ImageServerClient(imageserver, security) as client:
        reply = client.delete_image(name)
    click.echo(f"deleted image {name}, freed {reply.objects_freed} objects "
               f"({format_bytes(reply.bytes_freed)})")
