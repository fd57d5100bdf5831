"""``darkminer prompts info|filter``: look into a prompt CSV (I2P and the like) and keep a subset of its rows."""

from __future__ import annotations

import argparse

CONDITION_HELP = ("a row condition; repeat to require all. COLUMN~ITEM: the comma-separated cell holds ITEM "
                  "(any case), e.g. categories~sexual; COLUMN=VALUE and COLUMN!=VALUE: equal as numbers where both "
                  "are numbers, else as text, e.g. hard=1; COLUMN>=N, >N, <=N, <N: numeric, e.g. "
                  "'nudity_percentage>=50' (quoted: a shell reads > and < itself; empty or non-numeric cells never match)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prompts", help="inspect a prompt CSV, or keep the rows that match conditions",
                       description="Inspect a prompt CSV (I2P, UnlearnDiffAtk, your own), or write the rows that "
                                   "match conditions to a new CSV for `--prompts` (e.g. I2P's sexual, hard prompts).")
    commands = p.add_subparsers(dest="prompts_command", required=True, metavar="SUBCOMMAND")

    info = commands.add_parser("info", help="row count, columns, and one column's items or range",
                               description="Print the row count and the columns, and for one column either how many "
                                           "rows hold each of its comma-separated items (most first) or, for a "
                                           "numeric column, its min, median and max.")
    info.add_argument("prompts", metavar="IN.csv", help="the CSV file")
    info.add_argument("--column", default=None, help="the column to summarise (default: categories, when present)")
    info.set_defaults(handler=_info)

    keep = commands.add_parser("filter", help="write the rows that match every --where to a new CSV",
                               description="Write the rows of IN.csv that match every --where condition to OUT.csv: "
                                           "all columns, the header and each row exactly as in IN.csv, in its order. "
                                           "Example: darkminer prompts filter i2p.csv --where categories~sexual "
                                           "--where hard=1 --out i2p-sexual-hard.csv")
    keep.add_argument("prompts", metavar="IN.csv", help="the CSV file to read (never overwritten)")
    keep.add_argument("--where", action="append", required=True, metavar="COND", help=CONDITION_HELP)
    keep.add_argument("--out", required=True, metavar="OUT.csv", help="the CSV file to write")
    keep.set_defaults(handler=_filter)


def _info(args: argparse.Namespace) -> None:
    from darkminer.prompts import summarize_prompt_csv

    summary = summarize_prompt_csv(args.prompts, args.column)
    print(f"{summary.path}: {summary.rows} rows")
    print(f"columns: {', '.join(summary.columns)}")
    column = summary.column
    if column is None:
        return
    empty = f", {column.empty} empty" if column.empty else ""
    if column.numbers is not None:
        low, median, high = (_number_text(n) for n in column.numbers)
        print(f"{column.column}: min {low}, median {median}, max {high}{empty}")
        return
    print(f"{column.column} (rows holding each item{empty}):")
    width = len(str(column.items[0][1])) if column.items else 1
    for item, count in column.items:
        print(f"  {count:>{width}}  {item}")


def _number_text(number: int | float) -> str:
    """Whole numbers without ".0" or an exponent (seeds reach 4e9), others as Python writes them."""
    if isinstance(number, float) and number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return str(number)


def _filter(args: argparse.Namespace) -> None:
    from darkminer.prompts import filter_prompt_csv

    result = filter_prompt_csv(args.prompts, args.out, args.where)
    print(f"kept {result.kept} of {result.total} rows -> {result.out}")
