"""The herd's planning: dry-run summaries count the directories a plan keeps."""

from __future__ import annotations

from pathlib import Path

from dominator.herd.convergence import plan_update, summarize
from fleetlib.fstree.filter import Filter
from fleetlib.fstree.image import Image
from fleetlib.fstree.scan import scan_directory


def test_a_summary_counts_the_directories_kept_for_filtered_content(tmp_path: Path) -> None:
    host, golden = tmp_path / "host", tmp_path / "image"
    for root in (host, golden):
        (root / "etc").mkdir(parents=True)
        (root / "etc/issue").write_text("same\n")
    (host / "var/lib/dhcp").mkdir(parents=True)
    (host / "var/lib/dhcp/leases").write_text("lease\n")  # filtered, below a folder
    (host / "var/lib/stray").write_text("owned, not in the image\n")
    image = Image("v1", scan_directory(golden), Filter.from_lines([r"/var/lib/dhcp/.*"]))
    sub_tree = scan_directory(host)
    plan = plan_update(sub_tree, image, [])
    assert plan.diff.kept == ["/var", "/var/lib", "/var/lib/dhcp"]
    summary = summarize(plan, sub_tree)
    assert summary.kept == 3 and summary.deleted == 1
    assert summary.to_json()["kept"] == 3
