"""reconcile/memprofile.py: the memory report names what grew, in Python's allocators
(tracemalloc), the C heap (reconcile/malloc.py, tested in test_malloc.py) and the longest
containers with who holds them."""

import tracemalloc

import pytest

from lepton_operator.reconcile import memprofile

pytestmark = pytest.mark.unit


def test_a_second_report_names_the_line_that_grew_since_the_first(monkeypatch):
    monkeypatch.setattr(memprofile, "_first", None)
    monkeypatch.setattr(memprofile, "_previous", None)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start(1)
    try:
        first = memprofile.report()
        kept = [bytearray(4096) for _ in range(512)]  # 2 MiB from one line
        second = memprofile.report()
    finally:
        if started:
            tracemalloc.stop()
    assert "top 40 lines" in first and "growth since the previous dump" not in first
    growth = second.split("growth since the previous dump", 1)[1].split("\n## ", 1)[0]
    top = growth.splitlines()[2]  # the table's header, then the line that grew most
    assert "test_memprofile.py" in top and "bytearray(4096)" in top
    assert len(kept) == 512
    assert second.splitlines()[2].startswith("C heap (")


def test_without_tracemalloc_the_report_still_gives_rss_the_c_heap_and_object_counts(monkeypatch):
    if tracemalloc.is_tracing():
        pytest.skip("tracemalloc is on in this process")
    text = memprofile.report()
    assert text.splitlines()[1].startswith("RSS ")
    assert "tracemalloc is off" in text
    assert "live object types (gc)" in text


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_the_profile_stays_off_unless_the_variable_asks_for_it(value):
    assert memprofile.install_from_env({memprofile.ENV: value}) is False


class _Registry:
    def __init__(self) -> None:
        self.by_job: dict[str, str] = {}  # strings only: a dict the garbage collector does not track


class _Queue:
    def __init__(self) -> None:
        self.calls: list[tuple] = []  # (name, arguments) pairs


class _Slotted:
    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: list[int] = []


def test_the_containers_table_names_who_holds_a_growing_table(monkeypatch):
    monkeypatch.setattr(memprofile, "_previous_containers", {})
    registry, slotted, queue = _Registry(), _Slotted(), _Queue()
    registry.by_job.update({f"job-{i}": "uid" for i in range(40_000)})
    slotted.pending.extend(range(30_000))
    queue.calls.append(("post", list(range(20_000))))
    first = memprofile.report().split("containers by length", 1)[1]
    registry.by_job.update({f"job-{i}": "uid" for i in range(40_000, 50_000)})
    second = memprofile.report().split("containers by length", 1)[1]

    held = f"{__name__}._Registry.by_job"
    assert f"40000 |      new | dict | {held}" in first
    assert f"50000 |   +10000 | dict | {held}" in second
    assert f"30000 |       +0 | list | {__name__}._Slotted.pending" in second
    assert f"20000 |       +0 | list | builtins.tuple in builtins.list in {__name__}._Queue.calls" in second
