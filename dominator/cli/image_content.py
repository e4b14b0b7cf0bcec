"""`dominator image ...` commands that read or write an image's content (the group and
the rest are in image.py): add, show, cat, diff, filter, triggers and get.

`image show --json` lists each path as an object (see `tree_entries`).
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from dominator.cli.options import imageserver_option, json_option
from fleetlib.cli.display import echo_json, format_bytes, progress_bar
from fleetlib.cli.options import parse_duration, security_options
from fleetlib.cli.run import EXIT_NEGATIVE, EXIT_OK
from fleetlib.errors import FleetError, NotFoundError
from fleetlib.fstree.diff import Change, diff_trees
from fleetlib.fstree.filter import EMPTY, Filter, prune
from fleetlib.fstree.image import Image, ImageSignature, parse_computed_files
from fleetlib.fstree.imagename import check_image_name
from fleetlib.fstree.listing import format_inode, listing, quote
from fleetlib.fstree.objectstore import ObjectStore
from fleetlib.fstree.source import OciSource, Source, open_source
from fleetlib.fstree.tree import DEVICE_KINDS, Inode, Kind, Tree, check_clean_path, join
from fleetlib.fstree.triggers import load_triggers
from fleetlib.fstree.unpack import FreshTree, check_empty_destination, empty_directory
from fleetlib.rpc.tls import Security
from fleetlib.signing import describe_signer, fingerprint, load_private_key, sign_image
from imageserver.client import ImageServerClient

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
BINARY_PROBE = 8000  # like diff(1) and git: a NUL byte this early means binary content


@click.command(name="add")
@click.argument("name")
@click.argument("source", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--from-oci", "oci", metavar="FILE", type=click.Path(exists=True, path_type=Path),
              help="Instead of SOURCE: an OCI image layout (a directory, or a tar of one) or "
                   "a `docker save` tarball; its layers are applied in order, whiteouts "
                   "included, and every blob is checked against its digest.")
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
@click.option("--sign-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Sign the image with this private key (DIR/NAME.key of `dominator keys "
                   "create`).")
@json_option
@imageserver_option
@security_options
def add_command(name: str, source: Path | None, oci: Path | None, filter_file: Path | None,
                sparse: bool, triggers_file: Path | None, computed_file: Path | None,
                expires_in: str | None, sign_key: Path | None, as_json: bool, imageserver: str,
                security: Security) -> None:
    """Add image NAME from SOURCE: a directory, or a .tar, .tar.gz, .tar.zst, .tar.xz or
    .tar.bz2 file; or from a container image with --from-oci FILE.

    Only the objects the server lacks are uploaded (over several streams from a directory).
    """
    check_image_name(name)
    if (source is None) == (oci is None):
        raise FleetError("give SOURCE or --from-oci FILE (one of them)")
    if sparse and filter_file:
        raise FleetError("--sparse and --filter exclude each other")
    flt = None if sparse else Filter.load(filter_file) if filter_file else EMPTY
    triggers = load_triggers(triggers_file) if triggers_file else []
    computed = parse_computed_files(computed_file.read_text(), str(computed_file)) \
        if computed_file else []
    expires = int(time.time()) + parse_duration(expires_in) if expires_in else 0
    key = load_private_key(sign_key) if sign_key else None
    with ImageServerClient(imageserver, security) as client:
        if client.image_exists(name):
            raise FleetError(f"image {name} already exists (images are immutable)")
        started = time.monotonic()
        src: Source
        if oci is not None:
            src = OciSource(oci)
        else:
            assert source is not None  # one of them, checked above
            src = open_source(source)
        tree = prune(src.tree, flt)
        wanted = tree.object_sizes()
        missing = client.missing(wanted)
        with progress_bar(sum(missing.values()), f"uploading {len(missing)} objects") as advance:
            client.upload(src, missing, advance)
        img = Image(name, tree, flt, triggers, computed, expires_unix=expires)
        client.add_image(sign_image(img, key) if key else img)
    report: dict[str, Any] = {
        "image": name, "inodes": len(tree.inodes), "bytes": tree.total_bytes(),
        "uploaded_objects": len(missing), "uploaded_bytes": sum(missing.values()),
        "skipped_objects": len(wanted) - len(missing),
        "skipped_bytes": sum(wanted.values()) - sum(missing.values()),
        "seconds": round(time.monotonic() - started, 3),
        "signed_by": key.name if key else None,
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
    if key:
        click.echo(f"signed with key {key.name} ({fingerprint(key.public_key)})")


@click.command(name="show")
@click.argument("name")
@click.option("--hashes", is_flag=True, help="Add each file's sha256.")
@json_option
@imageserver_option
@security_options
def show_command(name: str, hashes: bool, as_json: bool, imageserver: str,
                 security: Security) -> None:
    """List image NAME like `ls -l`: mode, links, uid, gid, size, mtime, path.

    With --json: the image's filter, triggers, computed files and times, the listing
    lines, and "entries": one object per path with path, kind, mode (octal text such
    as "0644"), uid, gid, size, mtime_unix, mtime_ns and links, plus sha256 (regular
    files), target (symlinks), rdev/major/minor (devices), xattrs (name: base64 value)
    and link_to (a hard link: the first path of the same inode). Paths are printable:
    bytes that are not UTF-8 as \\xNN, a backslash doubled.
    """
    check_image_name(name)
    with ImageServerClient(imageserver, security) as client:
        img = client.get_image(name)
    if as_json:
        echo_json({
            "name": img.name, "created": img.created_unix, "expires": img.expires_unix,
            "created_unix": img.created_unix, "expires_unix": img.expires_unix,
            "filter": filter_lines(img),
            "triggers": [t.to_json() for t in img.triggers],
            "computed_files": [{"Filename": c.path, "Source": c.source}
                               for c in img.computed_files],
            "listing": list(listing(img.tree, hashes=True)),
            "entries": tree_entries(img.tree),
            "signature": signature_json(img.signature),
        })
        return
    click.echo(f"image {img.name}: {describe_signer(img.signature)}", err=True)
    for line in listing(img.tree, hashes):
        click.echo(line)


def signature_json(signature: ImageSignature | None) -> dict[str, str] | None:
    """`image show --json`'s "signature": key name, fingerprint, raw public key and
    signature in base64; None when unsigned."""
    if signature is None:
        return None
    return {"key_name": signature.key_name, "fingerprint": fingerprint(signature.public_key),
            "public_key": base64.b64encode(signature.public_key).decode(),
            "signature": base64.b64encode(signature.signature).decode()}


def filter_lines(img: Image) -> list[str] | None:
    """The image's filter lines as written, None for a sparse image (no filter)."""
    return None if img.filter is None else list(img.filter.lines)


def tree_entries(tree: Tree) -> list[dict[str, Any]]:
    """One object per path, in listing order (`image show --json`'s "entries")."""
    links = tree.link_counts()
    first_path: dict[int, str] = {}
    entries = []
    for path, ino, inode in tree.walk():
        entry: dict[str, Any] = {
            "path": quote(path), "kind": inode.kind.name.lower(), "mode": f"{inode.mode:04o}",
            "uid": inode.uid, "gid": inode.gid, "size": inode.size,
            "mtime_unix": inode.mtime_ns // 10**9, "mtime_ns": inode.mtime_ns,
            "links": links[ino]}
        if inode.kind == Kind.REGULAR:
            entry["sha256"] = inode.hash.hex() if inode.hash else EMPTY_SHA256
        elif inode.kind == Kind.SYMLINK:
            entry["target"] = quote(os.fsdecode(inode.target))
        elif inode.kind in DEVICE_KINDS:
            entry.update(rdev=inode.rdev, major=os.major(inode.rdev), minor=os.minor(inode.rdev))
        if inode.xattrs:
            entry["xattrs"] = {quote(os.fsdecode(key)): base64.b64encode(value).decode()
                               for key, value in inode.xattrs}
        if ino in first_path:
            entry["link_to"] = first_path[ino]
        else:
            first_path[ino] = entry["path"]
        entries.append(entry)
    return entries


def kind_text(inode: Inode) -> str:
    """'a directory', 'a regular file', 'a char device', ..."""
    text = {Kind.REGULAR: "regular file"}.get(inode.kind, inode.kind.name.lower().replace("_", " "))
    return f"a {text}"


def lookup(img: Image, path: str) -> Inode | None:
    """The inode at PATH in the image, None when it has none. Symlinks are not followed:
    one on the way is a FleetError saying where it points."""
    check_clean_path(path)
    tree, ino, walked = img.tree, img.tree.root, "/"
    for name in path[1:].split("/") if path != "/" else ():
        parent = tree.inodes[ino]
        if parent.kind == Kind.SYMLINK:
            raise FleetError(f"{quote(walked)} is a symlink to {quote(os.fsdecode(parent.target))} "
                             f"in image {img.name} (symlinks are not followed): give the path "
                             "it points to")
        child = tree.children.get(ino, {}).get(name)
        if child is None:
            return None
        ino, walked = child, join(walked, name)
    return tree.inodes[ino]


@contextmanager
def fetched(client: ImageServerClient, inodes: Sequence[Inode | None]) -> Iterator[ObjectStore]:
    """A scratch store in a temporary folder holding the content of `inodes`' regular
    files, downloaded and verified; removed afterwards."""
    hashes = sorted({i.hash for i in inodes if i is not None and i.hash})
    with tempfile.TemporaryDirectory(prefix="dominator-image-") as folder:
        store = ObjectStore(Path(folder), scratch=True)
        if hashes:
            client.fetch(hashes, store)
        yield store


def content(store: ObjectStore, inode: Inode | None) -> bytes:
    """What a diff compares: a regular file's bytes, a symlink's target (as git does),
    nothing for an absent file."""
    if inode is None:
        return b""
    if inode.kind == Kind.SYMLINK:
        return inode.target
    if not inode.hash:
        return b""
    with store.open(inode.hash) as reader:
        return reader.read()


@click.command(name="cat")
@click.argument("name")
@click.argument("path")
@imageserver_option
@security_options
def cat_command(name: str, path: str, imageserver: str, security: Security) -> None:
    """Print file PATH of image NAME on stdout, byte for byte (verified against its
    hash before any of it is printed).

    Exit 1 when the image has no PATH; 2 when PATH is a directory, a device, a fifo or
    a symlink (it says where the symlink points; symlinks are not followed).
    """
    check_image_name(name)
    check_clean_path(path)
    with ImageServerClient(imageserver, security) as client:
        img = client.get_image(name)
        inode = lookup(img, path)
        if inode is None:
            raise NotFoundError(f"{quote(path)} is not in image {name}")
        if inode.kind == Kind.SYMLINK:
            raise FleetError(f"{quote(path)} is a symlink to {quote(os.fsdecode(inode.target))} "
                             f"in image {name}: cat the path it points to")
        if inode.kind != Kind.REGULAR:
            raise FleetError(f"{quote(path)} is {kind_text(inode)} in image {name}, not a "
                             "regular file" + (f" (`image show {name}` lists it)"
                                               if inode.kind == Kind.DIRECTORY else ""))
        with fetched(client, [inode]) as store:
            if not inode.hash:
                return
            try:
                with store.open(inode.hash) as reader:
                    shutil.copyfileobj(reader, sys.stdout.buffer, 1 << 20)
                sys.stdout.buffer.flush()
            except BrokenPipeError:  # the reader had enough (`| head`): not an error
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@click.command(name="diff")
@click.argument("first")
@click.argument("second")
@click.option("--path", metavar="PATH",
              help="Compare only this file's content: a unified diff (`diff -u`).")
@imageserver_option
@security_options
def diff_command(first: str, second: str, path: str | None, imageserver: str,
                 security: Security) -> None:
    """Compare images FIRST and SECOND: what turning FIRST into SECOND changes.

    Lines: `+` added, `-` deleted, `M` content or kind differs, `m` only owner,
    mode, mtime or extended attributes differ. Exit 0 when the same, 1 when not.

    With --path PATH: a unified diff of that one file's content ("Binary files ...
    differ" for binary content; a file only one image holds diffs against /dev/null;
    a symlink compares as its target, as git does). Owner, mode and times are not
    compared there: the plain diff shows them.
    """
    check_image_name(first)
    check_image_name(second)
    if path is not None:
        check_clean_path(path)
    with ImageServerClient(imageserver, security) as client:
        old, new = client.get_image(first), client.get_image(second)
        if path is not None:
            sys.exit(diff_file(client, old, new, path))
    changes = diff_trees(old.tree, new.tree, EMPTY)
    for entry in sorted(changes.entries, key=lambda e: e.path):
        inode = entry.new if entry.new is not None else entry.old
        assert inode is not None
        suffix = f" (link to {entry.link_to})" if entry.link_to else ""
        click.echo(f"{entry.change.value} {format_inode(entry.path, inode)}{suffix}")
        if entry.change in (Change.REPLACE, Change.METADATA) and entry.old is not None:
            click.echo(f"  was {format_inode(entry.path, entry.old)}")
    sys.exit(1 if changes else 0)


def diffed_file(img: Image, path: str) -> Inode | None:
    """The regular file or symlink at PATH (None: absent); FleetError for other kinds."""
    inode = lookup(img, path)
    if inode is not None and inode.kind not in (Kind.REGULAR, Kind.SYMLINK):
        raise FleetError(f"{quote(path)} is {kind_text(inode)} in image {img.name}: --path "
                         "compares the content of files and symlinks")
    return inode


def diff_file(client: ImageServerClient, old: Image, new: Image, path: str) -> int:
    """Print the content diff of PATH from image OLD to NEW; the exit code (0 same)."""
    before, after = diffed_file(old, path), diffed_file(new, path)
    if before is None and after is None:
        raise FleetError(f"{quote(path)} is in neither image {old.name} nor {new.name}")
    if before is not None and after is not None and before.same_content(after):
        return EXIT_OK
    labels = [f"{img.name}:{quote(path)}" if inode is not None else "/dev/null"
              for img, inode in ((old, before), (new, after))]
    if before is not None and after is not None and before.kind != after.kind:
        click.echo(f"{quote(path)} is {kind_text(before)} in {old.name}, "
                   f"{kind_text(after)} in {new.name}")
    with fetched(client, [before, after]) as store:
        data = [content(store, before), content(store, after)]
    if any(b"\0" in side[:BINARY_PROBE] for side in data):
        click.echo(f"Binary files {labels[0]} and {labels[1]} differ")
    else:
        click.echo(unified_diff(data[0], data[1], labels[0], labels[1]), nl=False)
    return EXIT_NEGATIVE


def unified_diff(before: bytes, after: bytes, old_label: str, new_label: str) -> bytes:
    """`diff -u` of two byte strings (any encoding), with diff's "\\ No newline at end
    of file" after a last line that has none."""
    lines = difflib.diff_bytes(difflib.unified_diff, io.BytesIO(before).readlines(),
                               io.BytesIO(after).readlines(), os.fsencode(old_label),
                               os.fsencode(new_label))
    return b"".join(line if line.endswith(b"\n") else line + b"\n\\ No newline at end of file\n"
                    for line in lines)


@click.command(name="filter")
@click.argument("name")
@json_option
@imageserver_option
@security_options
def filter_command(name: str, as_json: bool, imageserver: str, security: Security) -> None:
    """Print the filter of image NAME, one regex per line, as `image add --filter FILE`
    reads it.

    A sparse image has no filter (it never deletes; `image add --sparse` makes one):
    that is said on stderr and the exit code is 1, so that `image filter A > f && image
    add B DIR --filter f` never turns a sparse image into one that owns every path.
    """
    check_image_name(name)
    with ImageServerClient(imageserver, security) as client:
        img = client.get_image(name)
    lines = filter_lines(img)
    if as_json:
        echo_json({"name": name, "sparse": lines is None, "filter": lines})
    elif lines is None:
        click.echo(f"image {name} is sparse: it has no filter (add one like it with --sparse)",
                   err=True)
    else:
        for line in lines:
            click.echo(line)
        if not lines:
            click.echo(f"image {name} has an empty filter: it owns every path", err=True)
    sys.exit(EXIT_NEGATIVE if lines is None else EXIT_OK)


@click.command(name="triggers")
@click.argument("name")
@json_option
@imageserver_option
@security_options
def triggers_command(name: str, as_json: bool, imageserver: str, security: Security) -> None:
    """Print the triggers of image NAME as Dominator's triggers JSON, as `image add
    --triggers FILE` reads it ([] when it has none). With --json: {"name", "triggers"}."""
    check_image_name(name)
    with ImageServerClient(imageserver, security) as client:
        img = client.get_image(name)
    triggers = [t.to_json() for t in img.triggers]
    echo_json({"name": name, "triggers": triggers} if as_json else triggers)


@click.command(name="get")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@imageserver_option
@security_options
def get_command(name: str, directory: Path, imageserver: str, security: Security) -> None:
    """Unpack image NAME into DIRECTORY (missing or empty) exactly: owners, modes,
    mtimes, extended attributes, hard links, symlinks and device nodes."""
    check_empty_destination(directory)
    made = not directory.exists()
    with ImageServerClient(imageserver, security) as client:
        img = client.get_image(name)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            with FreshTree(img.tree, directory) as fresh:
                sizes = img.tree.object_sizes()
                with progress_bar(sum(sizes.values()), f"fetching {len(sizes)} objects") \
                        as advance:
                    client.fetch(fresh.order(), fresh, advance)
                problems = fresh.finish()
        except BaseException:  # a failure leaves DIRECTORY as it was: missing or empty
            if made:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                empty_directory(directory)
            raise
    for problem in problems[:20]:
        click.echo(f"warning: {problem}", err=True)
    if len(problems) > 20:
        click.echo(f"warning: ... and {len(problems) - 20} more", err=True)
    click.echo(f"unpacked image {name} into {directory}: {len(img.tree.inodes)} inodes, "
               f"{format_bytes(img.tree.total_bytes())}")
