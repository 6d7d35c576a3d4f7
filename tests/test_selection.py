"""Image selection shared by train, evaluate and score (``pipelines.selection``)."""

from __future__ import annotations

from pipelines.archive import ArchiveEntry, parse_columns
from pipelines.selection import apply_only, training_split, without_labelled_anomalies


def _entry(path: str) -> ArchiveEntry:
    return ArchiveEntry(
        image_uri=f"file:///a/{path}",
        etag="1-1",
        size=1,
        mtime=None,
        path=path,
        columns=parse_columns(path),
    )


ENTRIES = [
    _entry(f"year={y}/camera={c}/img_{i}.jpg")
    for y in (2017, 2018, 2019)
    for c in (1, 2)
    for i in range(4)
]


def test_only_filters_all_hold_and_keys_are_case_blind():
    got = apply_only(ENTRIES, (("year", ("2017", "2019")), ("camera", ("2",))))
    assert {(e.columns["year"], e.columns["camera"]) for e in got} == {("2017", "2"), ("2019", "2")}
    assert len(got) == 8
    # a model trained by an older flowscore may record a mixed-case key, as a mapping
    assert apply_only(ENTRIES, {"Year": ["2018"]}) == [e for e in ENTRIES if "2018" in e.path]
    assert apply_only(ENTRIES, ()) == ENTRIES


def test_labelled_anomalies_left_out_and_the_split_is_reproducible():
    labels = {ENTRIES[0].path: 1, ENTRIES[1].path: 0}
    kept = without_labelled_anomalies(ENTRIES, labels)
    assert ENTRIES[0] not in kept and ENTRIES[1] in kept and len(kept) == len(ENTRIES) - 1
    train, held = training_split(kept, 0.25, seed=3)
    assert sorted(e.path for e in train + held) == sorted(e.path for e in kept)
    assert not {e.path for e in train} & {e.path for e in held} and len(held) >= 1
    assert training_split(kept, 0.25, seed=3) == (train, held)  # what evaluate rebuilds
