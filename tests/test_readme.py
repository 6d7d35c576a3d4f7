"""Every ``flowscore`` command in the README is a real command with real flags (parsed by the
CLI's own parser, so a typo fails), and every query in it runs against real tables."""

from __future__ import annotations

import io
import re
import shlex
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pytest

from jobs.cli import build_parser
from jobs.query import run_query
from pipelines import tables

README = Path(__file__).parent.parent / "README.md"


def readme_commands() -> list[list[str]]:
    text = README.read_text()
    out: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        tokens = shlex.split(block.replace("\\\n", " "), comments=True)
        cmd: list[str] | None = None
        for tok in tokens:
            if tok == "flowscore":
                cmd = [tok]
                out.append(cmd)
            elif cmd is not None:
                cmd.append(tok)
    return out


COMMANDS = readme_commands()


def test_the_readme_has_commands_for_every_part():
    subs = {c[1] for c in COMMANDS}
    assert {"train", "evaluate", "score", "query"} <= subs


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses(argv):
    args = build_parser().parse_args(argv[1:])
    assert args.command == argv[1]


def test_readme_queries_run_on_real_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSCORE_HOME", str(tmp_path))
    cat = tables.load_catalog_()
    tables.ensure_tables(cat, ["camera", "year"])
    schema = tables.image_scores_arrow_schema(["camera", "year"])
    rows = []
    for i in range(6):
        row = {f.name: None for f in schema}
        row.update(
            image_uri=f"file:///a/year=201{7 + i % 3}/camera={1 + i % 2}/img{i}.jpg",
            etag=f"e{i}",
            model_version="1",
            model_name="m",
            run_id="r",
            captured_at=datetime(2017 + i % 3, 8 + i % 3, 1),
            camera=str(1 + i % 2),
            year=str(2017 + i % 3),
            quality=-100.0 - i,
            anomaly_score=150.0 + i,
            is_anomaly=i == 5,
        )
        rows.append(row)
    tables.upsert(
        cat,
        "image_scores",
        pa.Table.from_pylist(rows, schema=schema),
        list(tables.TABLE_KEYS["image_scores"]),
    )
    queries = [c for c in COMMANDS if c[1] == "query"]
    assert len(queries) >= 3
    for argv in queries:
        buf = io.StringIO()
        err = io.StringIO()
        assert run_query(argv[2], "table", out=buf, err=err) == 0, err.getvalue()
        assert "rows)" in buf.getvalue()
