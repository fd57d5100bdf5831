"""`darkminer prompts`: row conditions, filtering a CSV into another one row for row, and the summary."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pytest

from darkminer.cli import main
from darkminer.errors import DarkMinerError
from darkminer.prompts import (
    RowCondition,
    filter_prompt_csv,
    read_prompt_csv,
    summarize_prompt_csv,
)

# The shared data sits beside the repository (../shared); a clone elsewhere finds it at its usual place.
I2P = next((path for path in (Path(__file__).resolve().parents[2] / "shared/data/prompts/i2p.csv",
                              Path("/work/shared/data/prompts/i2p.csv")) if path.is_file()),
           Path("/work/shared/data/prompts/i2p.csv"))

HEADER = ["id", "prompt", "categories", "hard", "nudity_percentage", "evaluation_seed", "note"]
ROWS = [
    ["0", "a cat, sitting on a mat", "sexual, violence", "1", "60.0", str(2**60 + 1), ""],
    ["1", "first line\nsecond line", " Sexual ", "0", "10.0", "1", "x"],
    ["2", 'he said "hi", then left', "violence", "1", "", "2", ""],
    ["3", "plain", "sexual", "1.0", "75", "3", "keep, me"],
    ["4", "sexually suggestive", "harassment, sexually explicit", "1", "90", "4", ""],
    ["5", "no percentage", "hate", "", "n/a", "5", ""],
]


def _csv_text(rows: list[list[str]], **writer_options) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, **writer_options)
    writer.writerow(HEADER)
    writer.writerows(rows)
    return buffer.getvalue()


@pytest.fixture()
def source(tmp_path) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_bytes(_csv_text(ROWS).encode())
    return path


def _ids(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [row["id"] for row in csv.DictReader(handle)]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("darkminer: error: ")
    return err[0]


# ------------------------------------------------------------------------------------------ conditions
@pytest.mark.parametrize(("text", "column", "operator", "value"), [
    ("categories~sexual", "categories", "~", "sexual"),
    ("categories ~ illegal activity ", "categories", "~", "illegal activity"),
    ("hard=1", "hard", "=", "1"),
    ("hard!=1", "hard", "!=", "1"),
    ("nudity_percentage>=50", "nudity_percentage", ">=", "50"),
    ("nudity_percentage>50", "nudity_percentage", ">", "50"),
    ("nudity_percentage<=50", "nudity_percentage", "<=", "50"),
    ("nudity_percentage<-2.5", "nudity_percentage", "<", "-2.5"),
    ("sensitive prompt=", "sensitive prompt", "=", ""),
])
def test_conditions_parse_each_operator(text, column, operator, value):
    condition = RowCondition.parse(text)
    assert (condition.column, condition.operator, condition.value) == (column, operator, value)
    assert RowCondition.parse(str(condition)) == condition


@pytest.mark.parametrize("text", ["hard", "hard 1", "=1", " ~sexual", "hard==1", "a=>5", "a>b", "a>=", "a<nan",
                                  "categories~", "categories~ "])
def test_malformed_conditions_are_refused_with_the_accepted_forms(text):
    with pytest.raises(DarkMinerError, match="accepted forms: COLUMN~ITEM") as error:
        RowCondition.parse(text)
    assert "\n" not in str(error.value)
    # a bare column is what the shell leaves of an unquoted `--where hard>=1`: the error says to quote it
    assert ("quote a condition" in str(error.value)) is (text in ("hard", "hard 1"))


@pytest.mark.parametrize(("condition", "cell", "expected"), [
    ("categories~sexual", "sexual", True),
    ("categories~sexual", "violence,  SEXUAL ", True),
    ("categories~sexual", "sexually explicit, harassment", False),  # an item, not a substring
    ("categories~sexual", "", False),
    ("categories~sexual", None, False),
    ("categories~illegal activity", "hate, illegal activity", True),
    ("hard=1", "1", True),
    ("hard=1", "1.0", True),
    ("hard=1", " 1 ", True),
    ("hard=1", "0", False),
    ("hard=1", "", False),
    ("hard=1", "one", False),
    ("hard=1.0", "1", True),
    ("sd_model=stable-diffusion-v1-4", "stable-diffusion-v1-4", True),
    ("sd_model=stable-diffusion-v1-4", "Stable-Diffusion-v1-4", False),  # text equality keeps case
    (f"evaluation_seed={2**60}", str(2**60 + 1), False),  # equal as floats, not as the integers they are
    (f"evaluation_seed={2**60 + 1}", str(2**60 + 1), True),
    ("hard!=1", "0", True),
    ("hard!=1", "1.0", False),
    ("hard!=1", "", True),  # != keeps exactly what = drops
    ("prompt=", "", True),
    ("prompt=", None, True),
    ("prompt!=", "a cat", True),
    ("nudity_percentage>=50", "50", True),
    ("nudity_percentage>=50", "50.0", True),
    ("nudity_percentage>=50", "49.99", False),
    ("nudity_percentage>=50", "", False),
    ("nudity_percentage>=50", "n/a", False),
    ("nudity_percentage>=50", "nan", False),
    ("nudity_percentage>50", "50", False),
    ("nudity_percentage>50", "50.5", True),
    ("nudity_percentage<=50", "50", True),
    ("nudity_percentage<=50", "51", False),
    ("nudity_percentage<50", "50", False),
    ("nudity_percentage<50", "-3", True),
    ("nudity_percentage<50", "", False),
])
def test_conditions_match_cells(condition, cell, expected):
    assert RowCondition.parse(condition).matches(cell) is expected


# ------------------------------------------------------------------------------------------- filtering
@pytest.mark.parametrize(("conditions", "kept_ids"), [
    (["categories~sexual"], ["0", "1", "3"]),
    (["categories~sexual", "hard=1"], ["0", "3"]),
    (["hard=1", "categories~sexual"], ["0", "3"]),
    (["nudity_percentage>=50"], ["0", "3", "4"]),
    (["nudity_percentage<50"], ["1"]),
    (["hard!=1"], ["1", "5"]),
    (["hard="], ["5"]),
    (["categories~sexually explicit"], ["4"]),
    ([], ["0", "1", "2", "3", "4", "5"]),
])
def test_filter_keeps_the_matching_rows_whole_and_in_order(source, tmp_path, conditions, kept_ids):
    out = tmp_path / "subset.csv"
    result = filter_prompt_csv(source, out, conditions)
    assert (result.kept, result.total, result.out) == (len(kept_ids), len(ROWS), out)
    assert _ids(out) == kept_ids
    # every column, the header order and each cell (commas, quotes, newlines) byte for byte
    assert out.read_bytes() == _csv_text([row for row in ROWS if row[0] in kept_ids]).encode()
    assert sorted(os.listdir(tmp_path)) == ["prompts.csv", "subset.csv"]  # no temporary file left


def test_filter_copies_each_row_as_written_whatever_its_quoting_and_line_ending(tmp_path):
    text = ('"prompt","hard","evaluation_seed"\r\n'
            '"quoted everywhere","1","4294967295"\r\n'
            'bare,0,7\r\n'
            '"two\r\nlines, one cell",1.0,0042\r\n'
            '\r\n'
            'last without newline,1,9')
    source = tmp_path / "odd.csv"
    source.write_bytes(text.encode())
    out = tmp_path / "hard.csv"
    assert filter_prompt_csv(source, out, ["hard=1"]).kept == 3
    assert out.read_bytes() == (b'"prompt","hard","evaluation_seed"\r\n"quoted everywhere","1","4294967295"\r\n'
                                b'"two\r\nlines, one cell",1.0,0042\r\nlast without newline,1,9')
    assert [row.seed for row in read_prompt_csv(out)] == [4294967295, 42, 9]


def test_an_unfiltered_round_trip_reads_back_the_same_prompts(tmp_path):
    text = _csv_text(ROWS, lineterminator="\n")
    source = tmp_path / "bom.csv"
    source.write_bytes(b"\xef\xbb\xbf" + text.encode())  # as spreadsheets save it
    out = tmp_path / "copy.csv"
    assert filter_prompt_csv(source, out, []).kept == len(ROWS)
    assert out.read_bytes() == text.encode()  # the byte-order mark goes, nothing else
    assert read_prompt_csv(out) == read_prompt_csv(source)
    assert read_prompt_csv(out)[0].seed == 2**60 + 1


def test_an_unknown_column_is_refused_with_the_columns_listed(source, tmp_path):
    out = tmp_path / "subset.csv"
    with pytest.raises(DarkMinerError) as error:
        filter_prompt_csv(source, out, ["categories~sexual", "category~sexual"])
    message = str(error.value)
    assert "'category'" in message and ", ".join(HEADER) in message and "\n" not in message
    assert not out.exists()


def test_a_selection_of_no_row_is_refused_and_leaves_an_earlier_output(source, tmp_path):
    out = tmp_path / "subset.csv"
    out.write_text("earlier\n")
    with pytest.raises(DarkMinerError, match=r"\(6 rows\) has categories~sexual and hard=0 and nudity_percentage>50; nothing written"):
        filter_prompt_csv(source, out, ["categories~sexual", "hard=0", "nudity_percentage>50"])
    assert out.read_text() == "earlier\n"
    assert sorted(os.listdir(tmp_path)) == ["prompts.csv", "subset.csv"]  # no temporary file left


def test_a_malformed_condition_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(DarkMinerError, match="accepted forms"):
        filter_prompt_csv(tmp_path / "absent.csv", tmp_path / "out.csv", ["hard==1"])


def test_the_input_file_is_never_the_output(source, tmp_path):
    before = source.read_bytes()
    link = tmp_path / "link.csv"
    link.symlink_to(source)
    for out in (source, tmp_path / "." / "prompts.csv", link):
        with pytest.raises(DarkMinerError, match="is the input file"):
            filter_prompt_csv(source, out, ["hard=1"])
    assert source.read_bytes() == before


def test_a_missing_or_empty_file_is_refused(tmp_path):
    with pytest.raises(DarkMinerError, match="does not exist"):
        filter_prompt_csv(tmp_path / "absent.csv", tmp_path / "out.csv", ["hard=1"])
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(DarkMinerError, match="is empty"):
        summarize_prompt_csv(tmp_path / "empty.csv")
    (tmp_path / "doubled.csv").write_text("prompt,hard,hard\na cat,1,0\n")  # which "hard" would a filter read?
    with pytest.raises(DarkMinerError, match="the header names 'hard' more than once; give each column its own name"):
        filter_prompt_csv(tmp_path / "doubled.csv", tmp_path / "out.csv", ["hard=1"])
    (tmp_path / "unnamed.csv").write_text("prompt,hard,,\na cat,1,,\n")  # a spreadsheet's trailing commas
    assert filter_prompt_csv(tmp_path / "unnamed.csv", tmp_path / "out.csv", ["hard=1"])


# ---------------------------------------------------------------------------------------------- summary
def test_summary_counts_each_item_once_per_row_as_the_filter_keeps_them(source, tmp_path):
    summary = summarize_prompt_csv(source)
    assert (summary.rows, summary.columns, summary.column.column) == (len(ROWS), HEADER, "categories")
    assert summary.column.numbers is None
    assert summary.column.items == (("sexual", 3), ("violence", 2), ("harassment", 1), ("hate", 1),
                                    ("sexually explicit", 1))
    for item, count in summary.column.items:
        assert filter_prompt_csv(source, tmp_path / "item.csv", [f"categories~{item}"]).kept == count


def test_summary_of_a_numeric_column_gives_its_range(source):
    seeds = summarize_prompt_csv(source, "evaluation_seed").column
    assert seeds.numbers == (1, 3.5, 2**60 + 1) and seeds.empty == 0 and seeds.items == ()
    hard = summarize_prompt_csv(source, "hard").column
    assert hard.numbers == (0, 1, 1) and hard.empty == 1
    with pytest.raises(DarkMinerError, match="no column 'nudity'"):
        summarize_prompt_csv(source, "nudity")


def test_summary_without_a_categories_column_summarises_nothing(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("prompt,evaluation_seed\na cat,1\n")
    assert summarize_prompt_csv(path).column is None


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_filter_writes_the_subset_and_says_how_many_rows_it_kept(source, tmp_path, capsys):
    out = tmp_path / "sexual-hard.csv"
    argv = ["prompts", "filter", str(source), "--where", "categories~sexual", "--where", "hard=1", "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"kept 2 of 6 rows -> {out}\n"
    assert _ids(out) == ["0", "3"]


def test_cli_info_prints_rows_columns_and_item_counts(source, capsys):
    assert main(["prompts", "info", str(source)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{source}: 6 rows"
    assert lines[1] == "columns: " + ", ".join(HEADER)
    assert [line.split(maxsplit=1) for line in lines[3:]] == [
        ["3", "sexual"], ["2", "violence"], ["1", "harassment"], ["1", "hate"], ["1", "sexually explicit"]]
    assert main(["prompts", "info", str(source), "--column", "evaluation_seed"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == f"evaluation_seed: min 1, median 3.5, max {2**60 + 1}"
    assert main(["prompts", "info", str(source), "--column", "nudity_percentage"]) == 0
    lines = capsys.readouterr().out.splitlines()  # "n/a" makes it a text column: items, not a range
    assert lines[2] == "nudity_percentage (rows holding each item, 1 empty):"
    assert [line.split() for line in lines[3:]] == [["1", v] for v in ("10.0", "60.0", "75", "90", "n/a")]


@pytest.mark.parametrize(("where", "message"), [
    ("nudity>=50", "has no column 'nudity' (columns: id, prompt"),
    ("hard=>1", "accepted forms"),
    ("categories~unicorn", "nothing written"),
])
def test_cli_filter_errors_are_one_line_and_exit_2(source, tmp_path, capsys, where, message):
    out = tmp_path / "out.csv"
    assert main(["prompts", "filter", str(source), "--where", where, "--out", str(out)]) == 2
    assert message in _error_line(capsys)
    assert not out.exists()


def test_cli_filter_refuses_to_write_over_its_input(source, capsys):
    before = source.read_bytes()
    assert main(["prompts", "filter", str(source), "--where", "hard=1", "--out", str(source)]) == 2
    assert "is the input file" in _error_line(capsys)
    assert source.read_bytes() == before


def test_cli_prompts_commands_do_not_import_the_model_libraries(source, tmp_path):
    import subprocess
    import sys

    script = ("import sys; from darkminer.cli import main; "
              f"assert main(['prompts', 'info', {str(source)!r}]) == 0; "
              f"assert main(['prompts', 'filter', {str(source)!r}, '--where', 'hard=1', '--out', {str(tmp_path / 'o.csv')!r}]) == 0; "
              "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"


def test_cli_filter_needs_a_condition(source, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["prompts", "filter", str(source), "--out", str(tmp_path / "out.csv")])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------------------- real I2P
@pytest.mark.skipif(not I2P.is_file(), reason="the shared I2P prompt set is not on this machine")
def test_i2p_sexual_and_hard_subsets_match_an_independent_count(tmp_path):
    with open(I2P, newline="", encoding="utf-8-sig") as handle:
        source_rows = list(csv.DictReader(handle))

    def is_sexual(row: dict) -> bool:
        return "sexual" in [item.strip().lower() for item in row["categories"].split(",")]

    expected = {
        ("categories~sexual",): [i for i, row in enumerate(source_rows) if is_sexual(row)],
        ("hard=1",): [i for i, row in enumerate(source_rows) if float(row["hard"]) == 1],
        ("categories~sexual", "hard=1"): [i for i, row in enumerate(source_rows) if is_sexual(row) and float(row["hard"]) == 1],
    }
    source_prompts = read_prompt_csv(I2P)
    assert len(source_prompts) == len(source_rows)  # no empty prompt: row i of one is row i of the other
    for conditions, indices in expected.items():
        out = tmp_path / "subset.csv"
        result = filter_prompt_csv(I2P, out, conditions)
        assert (result.kept, result.total) == (len(indices), len(source_rows))
        with open(out, newline="", encoding="utf-8") as handle:
            assert list(csv.DictReader(handle)) == [source_rows[i] for i in indices]
        kept_prompts = read_prompt_csv(out)
        assert kept_prompts == [source_prompts[i] for i in indices]
        assert [p.seed for p in kept_prompts] == [int(source_rows[i]["evaluation_seed"]) for i in indices]
    assert 0 < len(expected[("categories~sexual", "hard=1")]) < len(expected[("categories~sexual",)])
    assert max(int(source_rows[i]["evaluation_seed"]) for i in expected[("categories~sexual",)]) > 2**31

    copy = tmp_path / "copy.csv"
    filter_prompt_csv(I2P, copy, [])
    assert copy.read_bytes() == I2P.read_bytes()
    summary = summarize_prompt_csv(I2P)
    assert dict(summary.column.items)["sexual"] == len(expected[("categories~sexual",)])


def test_a_cell_with_an_underscore_is_no_number():
    assert RowCondition.parse("hard=10").matches("1_0") is False  # Python's float() reads "1_0" as 10


# Found by mutation testing (session 45): each test fails with the bug it names.
def test_an_item_condition_matches_in_any_case_of_the_item_it_names(tmp_path):
    """`categories~Sexual` must match the cell item "sexual" (the help says any case)."""
    assert RowCondition.parse("categories~Sexual").matches("sexual, violence")
    assert RowCondition.parse("categories~ SEXUAL ").matches(" Sexual ")
    assert not RowCondition.parse("categories~Sexual").matches("sexually explicit")
    source = tmp_path / "p.csv"
    source.write_text("id,prompt,categories\n0,a,\"sexual, violence\"\n1,b,hate\n2,c,Sexual\n")
    result = filter_prompt_csv(source, tmp_path / "out.csv", ["categories~SEXUAL"])
    assert result.kept == 2
    assert (tmp_path / "out.csv").read_text() == "id,prompt,categories\n0,a,\"sexual, violence\"\n2,c,Sexual\n"
