"""virsh's layouts (qcow2engine.cli.tree_render) against texts written out by hand.

Every expected text ends with the "\\n" virsh prints after each command.  The tree of
test_tree_libvirt_fanout and the tables of test_machine_table_libvirt_example are libvirt's
own expected outputs (tests/virshtestdata/snapshot.out, tests/vshtabletest.c).
"""
from __future__ import annotations

import datetime as dt
import re

import pytest

from qcow2engine.cli.tree_render import (machine_table, snapshot_info, snapshot_names,
                                         snapshot_table, snapshot_tree)

UTC = dt.timezone.utc


# --tree

def test_tree_seed_two_roots():
    items = [("z", None), ("e", "a"), ("d", "b"), ("a", None), ("c", "b"), ("b", "a")]
    assert snapshot_tree(items) == (
        "a\n"
        "  |\n"
        "  +- b\n"
        "  |   |\n"
        "  |   +- c\n"
        "  |   +- d\n"
        "  |     \n"
        "  +- e\n"
        "    \n"
        "z\n"
        "\n"
        "\n")


def test_tree_one_node():
    assert snapshot_tree([("only", None)]) == "only\n\n\n"


def test_tree_chain_of_three():
    assert snapshot_tree([("c", "b"), ("b", "a"), ("a", None)]) == (
        "a\n"
        "  |\n"
        "  +- b\n"
        "      |\n"
        "      +- c\n"
        "        \n"
        "\n")


def test_tree_libvirt_fanout():
    items = [("s1", None), ("s3", "s1"), ("s2", "s3"), ("s6", "s3"), ("s5", "s6"),
             ("s4", "s6"), ("s7", "s1"), ("s8", "s7")]
    assert snapshot_tree(items) == (
        "s1\n"
        "  |\n"
        "  +- s3\n"
        "  |   |\n"
        "  |   +- s2\n"
        "  |   +- s6\n"
        "  |       |\n"
        "  |       +- s4\n"
        "  |       +- s5\n"
        "  |         \n"
        "  +- s7\n"
        "      |\n"
        "      +- s8\n"
        "        \n"
        "\n")


def test_tree_order_is_strcasecmp():
    # strcasecmp folds to lower case: "_" (0x5f) sorts before letters
    items = [("root", None), ("beta", "root"), ("Alpha", "root"), ("_x", "root"),
             ("Zed", None), ("apple", None)]
    assert snapshot_tree(items) == (
        "apple\n"
        "\n"
        "root\n"
        "  |\n"
        "  +- _x\n"
        "  +- Alpha\n"
        "  +- beta\n"
        "    \n"
        "Zed\n"
        "\n"
        "\n")


def test_tree_empty():
    assert snapshot_tree([]) == "\n"


@pytest.mark.parametrize("items", [
    [("a", None), ("b", "missing")],
    [("a", None), ("b", "c"), ("c", "b")],
    [("a", None), ("a", None)],
])
def test_tree_rejects_what_virsh_cannot_list(items):
    with pytest.raises(ValueError):
        snapshot_tree(items)


# snapshot-list table and --name

ROWS = [
    {"name": "base", "created": 1600000000, "state": "shutoff", "parent": None},
    {"name": "after-update", "created": 1700000000.9, "state": "disk-snapshot",
     "parent": "base"},
]


def test_snapshot_table():
    assert snapshot_table(ROWS, tz=UTC) == (
        " Name           Creation Time               State\n"
        "-----------------------------------------------------------\n"
        " after-update   2023-11-14 22:13:20 +0000   disk-snapshot\n"
        " base           2020-09-13 12:26:40 +0000   shutoff\n"
        "\n")


def test_snapshot_table_parent_column():
    assert snapshot_table(ROWS, parent=True, tz=UTC) == (
        " Name           Creation Time               State           Parent\n"
        "--------------------------------------------------------------------\n"
        " after-update   2023-11-14 22:13:20 +0000   disk-snapshot   base\n"
        " base           2020-09-13 12:26:40 +0000   shutoff         \n"
        "\n")


def test_snapshot_table_empty():
    assert snapshot_table([], tz=UTC) == (
        " Name   Creation Time   State\n"
        "-------------------------------\n"
        "\n")
    assert snapshot_table([], parent=True, tz=UTC) == (
        " Name   Creation Time   State   Parent\n"
        "----------------------------------------\n"
        "\n")


def test_snapshot_table_display_width():
    rows = [{"name": "快照-1", "created": 1600000000, "state": "running", "parent": None},
            {"name": "été", "created": 1600000000, "state": "shutoff", "parent": None}]
    assert snapshot_table(rows, tz=UTC) == (
        " Name     Creation Time               State\n"
        "-----------------------------------------------\n"
        " été      2020-09-13 12:26:40 +0000   shutoff\n"
        " 快照-1   2020-09-13 12:26:40 +0000   running\n"
        "\n")


@pytest.mark.parametrize("tz,stamp", [
    (dt.timezone(dt.timedelta(hours=5, minutes=30)), "2020-09-13 17:56:40 +0530"),
    (dt.timezone(-dt.timedelta(hours=3)), "2020-09-13 09:26:40 -0300"),
])
def test_snapshot_table_zone(tz, stamp):
    rows = [{"name": "s", "created": 1600000000, "state": "running", "parent": None}]
    assert snapshot_table(rows, tz=tz) == (
        " Name   Creation Time               State\n"
        "---------------------------------------------\n"
        " s      " + stamp + "   running\n"
        "\n")


def test_snapshot_table_local_zone_shape():
    rows = [{"name": "s", "created": 1600000000, "state": "running", "parent": None}]
    line = snapshot_table(rows).splitlines()[2]
    assert re.fullmatch(r" s      2020-09-1[34] \d\d:\d\d:40 [+-]\d{4}   running", line)


def test_snapshot_names():
    rows = [{"name": "b"}, {"name": "A"}, {"name": "c"}]
    assert snapshot_names(rows) == "A\nb\nc\n\n"
    assert snapshot_names([]) == "\n"


# snapshot-info

def test_snapshot_info():
    fields = {"name": "snap1", "domain": "vm1", "current": True, "state": "shutoff",
              "location": "internal", "parent": None, "children": 2, "descendants": 3,
              "metadata": True}
    assert snapshot_info(fields) == (
        "Name:           snap1\n"
        "Domain:         vm1\n"
        "Current:        yes\n"
        "State:          shutoff\n"
        "Location:       internal\n"
        "Parent:         -\n"
        "Children:       2\n"
        "Descendants:    3\n"
        "Metadata:       yes\n"
        "\n")


def test_snapshot_info_with_parent():
    fields = {"name": "s2", "domain": "vm1", "current": False, "state": "disk-snapshot",
              "location": "external", "parent": "s1", "children": 0, "descendants": 0,
              "metadata": False}
    assert snapshot_info(fields) == (
        "Name:           s2\n"
        "Domain:         vm1\n"
        "Current:        no\n"
        "State:          disk-snapshot\n"
        "Location:       external\n"
        "Parent:         s1\n"
        "Children:       0\n"
        "Descendants:    0\n"
        "Metadata:       no\n"
        "\n")


# list --all

def test_machine_table_libvirt_example():
    rows = [{"name": "fedora28", "state": "running", "id": 1},
            {"name": "rhel7.5", "state": "running", "id": 2}]
    assert machine_table(rows) == (
        " Id   Name       State\n"
        "--------------------------\n"
        " 1    fedora28   running\n"
        " 2    rhel7.5    running\n"
        "\n")


def test_machine_table_all():
    rows = [{"name": "web", "state": "running", "id": 3},
            {"name": "Backup", "state": "shutoff"},
            {"name": "db", "state": "paused", "id": 1},
            {"name": "alpha", "state": "shut off"}]
    assert machine_table(rows) == (
        " Id   Name     State\n"
        "-------------------------\n"
        " 1    db       paused\n"
        " 3    web      running\n"
        " -    alpha    shut off\n"
        " -    Backup   shut off\n"
        "\n")


def test_machine_table_empty():
    assert machine_table([]) == (
        " Id   Name   State\n"
        "--------------------\n"
        "\n")


def test_table_escapes_control_characters():
    rows = [{"name": "f\aedora28", "state": "running", "id": 1},
            {"name": "rhel7.5", "state": "running", "id": 2},
            {"name": "a\\xb", "state": "shutoff"}]
    assert machine_table(rows) == (
        " Id   Name           State\n"
        "-------------------------------\n"
        " 1    f\\x07edora28   running\n"
        " 2    rhel7.5        running\n"
        " -    a\\x5cxb        shut off\n"
        "\n")


def test_table_escapes_non_printable_non_ascii():
    # U+0085 is 2 UTF-8 bytes; each is printed through "\\x%02x" as a signed char and cut
    # to 4 characters: "\\xff" (x86-64)
    rows = [{"name": "a\u0085b", "state": "shutoff"}]
    assert machine_table(rows) == (
        " Id   Name         State\n"
        "-----------------------------\n"
        " -    a\\xff\\xffb   shut off\n"
        "\n")
