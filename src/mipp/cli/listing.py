"""``mipp list [models|datasets|methods|all]``: what mipp can build, load and prune with."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from mipp.cli._common import make_console
from mipp.methods import METHOD_NAMES, METHODS, NOT_IMPLEMENTED, describe_method, make_method
from mipp.zoo import models
from mipp.zoo.data import FOLDER_DATASETS, describe_dataset, list_datasets

__all__ = ["register", "run"]

WHAT = ("models", "datasets", "methods", "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "list", help="list the models, datasets and pruning methods mipp knows"
    )
    p.add_argument(
        "what", nargs="?", choices=WHAT, default="all", help="what to list (default: all)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = make_console()
    if args.what in ("models", "all"):
        table = Table(title="models (mipp.zoo.models.create)")
        table.add_column("name")
        table.add_column("description")
        for name in models.list_models():
            table.add_row(name, escape(models.describe(name)))
        console.print(table)
    if args.what in ("datasets", "all"):
        table = Table(title="datasets (mipp.zoo.data.load_dataset)")
        table.add_column("name")
        table.add_column("description")
        for name in list_datasets():
            table.add_row(name, escape(describe_dataset(name)))
        console.print(table)
        table = Table(title="image-folder datasets (sweeps; mipp.zoo.data.load_folder_dataset)")
        table.add_column("name")
        table.add_column("description")
        for name, info in FOLDER_DATASETS.items():
            table.add_row(name, escape(info.description))
        console.print(table)
    if args.what in ("methods", "all"):
        table = Table(title="pruning methods (mipp prune --method NAME)")
        for col in ("name", "allocation", "labels", "description"):
            table.add_column(col)
        for name in METHOD_NAMES:
            allocation = getattr(make_method(name), "allocation", "its own")
            labels = "yes" if METHODS[name].needs_labels else "no"
            table.add_row(name, allocation, labels, escape(describe_method(name)))
        console.print(table)
        table = Table(title="named but not implemented (asking for one gives the reason)")
        table.add_column("name")
        table.add_column("why not")
        for name, why in NOT_IMPLEMENTED.items():
            table.add_row(name, escape(why.split(": ", 1)[0]))
        console.print(table)
    return 0
