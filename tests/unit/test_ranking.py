"""The order in which a host tries the image servers (dominator/herd/ranking.py)."""

from __future__ import annotations

from collections import Counter

from dominator.herd.ranking import ImageServerInfo, common_prefix, rank_servers

MASTER = ImageServerInfo("master:6971", "us-east/dc1", is_master=True)


def test_common_prefix_is_component_wise() -> None:
    assert common_prefix("us-east/dc1/r4", "us-east/dc1/r9") == 2
    assert common_prefix("us-east/dc1", "us-east/dc10") == 1  # not a string prefix
    assert common_prefix("us-east/dc1/r4", "us-east/dc1/r4") == 3
    assert common_prefix("", "us-east/dc1") == 0


def test_nearest_first_and_master_last() -> None:
    servers = [MASTER,
               ImageServerInfo("eu:6971", "eu-west/dc1"),
               ImageServerInfo("region:6971", "us-east/dc2"),
               ImageServerInfo("rack:6971", "us-east/dc1/r4"),
               ImageServerInfo("dc:6971", "us-east/dc1")]
    assert rank_servers("web1", "us-east/dc1/r4", servers) == \
        ["rack:6971", "dc:6971", "region:6971", "eu:6971", "master:6971"]
    # The master is last even when it stands next to the host.
    assert rank_servers("web1", "us-east/dc1", servers)[-1] == "master:6971"
    # A host with no location still gets every server, the master last.
    unplaced = rank_servers("web1", "", servers)
    assert sorted(unplaced) == sorted(s.address for s in servers)
    assert unplaced[-1] == "master:6971"


def test_ranking_is_stable_and_ignores_input_order() -> None:
    servers = [ImageServerInfo(f"r{i}:6971", "eu/dc1") for i in range(3)] + [MASTER]
    first = rank_servers("host-7", "eu/dc1/r1", servers)
    assert rank_servers("host-7", "eu/dc1/r1", list(reversed(servers))) == first
    assert rank_servers("host-7", "eu/dc1/r1", servers + servers) == first


def test_equal_replicas_share_the_hosts() -> None:
    replicas = [ImageServerInfo(f"replica-{i}:6971", "eu/dc1") for i in range(3)]
    firsts = Counter(rank_servers(f"host-{n}", "eu/dc1/r2", [MASTER, *replicas])[0]
                     for n in range(300))
    assert set(firsts) == {replica.address for replica in replicas}
    # Each replica's share is within 20% of an even split (the hash is fixed: no flakes).
    assert all(80 <= count <= 120 for count in firsts.values()), firsts
