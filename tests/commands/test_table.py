"""The subcommand list is written once (diffscore.commands.SUBCOMMANDS): the usage text, the dispatch, the README
and the functions behind it all come from it and agree."""

from __future__ import annotations

import inspect

from diffscore.commands import LIGHTNING_SUBCOMMANDS, SUBCOMMANDS, function_of, subcommand_of, usage
from diffscore.commands.parsing import build_parser
from tests.conftest import REPO


def test_every_subcommand_is_listed_dispatched_documented_and_has_its_function():
    text, readme = usage(), (REPO / "README.md").read_text()
    for command in SUBCOMMANDS:
        assert f"  {command.name} " in text
        found, rest = subcommand_of([*command.name.split(), "--help"])
        assert found is command and rest == ["--help"]
        assert f"diffscore {command.name}" in readme, f"README never shows `diffscore {command.name}`"
        if command.name in LIGHTNING_SUBCOMMANDS:
            continue
        fn = function_of(command)
        assert inspect.isfunction(fn) and fn.__doc__, command.name
        parser = build_parser(fn, f"diffscore {command.name}")  # every parameter becomes an option
        assert parser.format_help()
    assert set(LIGHTNING_SUBCOMMANDS) == {"fit", "validate", "test"}


def test_unknown_subcommands_are_refused_in_one_line(capsys):
    from tests.conftest import run_cli

    assert run_cli(["sampel"]) == 2
    assert run_cli(["probe", "ntkk"]) == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'sampel'" in err and "unknown subcommand probe gaussian|ntk" in err
