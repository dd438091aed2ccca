"""Every entry point follows `backpack_jax.cli`: a user's mistake is one `error: ...` line on
stderr and exit status 2, the usage names the real program, and --help shows it and exits 0.
Each command runs in-process (its `main`), not in a subprocess."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import pytest

from backpack_jax import cli

# module -> arguments that are a user's mistake of that command, given the missing path.
MISTAKES = {
    "backpack_jax.generate": lambda missing: ["--checkpoint", missing, "--prompt", "hi"],
    "backpack_jax.senses": lambda missing: ["--checkpoint", missing, "--word", "nurse"],
    "backpack_jax.attribution": lambda missing: ["--checkpoint", missing, "--text", "hi"],
    "backpack_jax.demo": lambda missing: ["--checkpoint", missing, "--compile_cache", ""],
    "backpack_jax.evals.similarity": lambda missing: ["--checkpoint", missing, "--data", missing],
    "backpack_jax.evals.gender": lambda missing: ["--checkpoint", missing],
    "backpack_jax.evals.topic": lambda missing: ["--checkpoint", missing],
    "backpack_jax.evals.edit": lambda missing: ["--checkpoint", missing],
    "train.eval": lambda missing: ["--checkpoint", missing],
    "train.data": lambda missing: ["inspect", "nothing", "--data_dir", missing],
    "convert.hf_to_flax": lambda missing: [missing, missing + "_out"],
    "convert.flax_to_hf": lambda missing: [missing, missing + "_out"],
}
# Commands whose mistake is caught while parsing: the usage line comes before the error.
PARSE_MISTAKES = {
    "train.run": ["--config=nothing"],
    "bench": ["--only", "nothing"],
}
# The harness hands its flags to lm-eval's own parser: its help is lm-eval's.
MODULES = [*MISTAKES, *PARSE_MISTAKES, "backpack_jax.evals.harness"]


def _main(module: str):
    if module == "backpack_jax.evals.harness":
        pytest.importorskip("lm_eval", reason="pip install 'backpack-jax[eval]'")
    return importlib.import_module("bench.__main__" if module == "bench" else module).main


def _exit(main, argv, capsys) -> tuple[int, str, list[str]]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err.splitlines()


@pytest.mark.parametrize("module", list(MISTAKES))
def test_a_mistake_after_parsing_is_one_error_line(module, tmp_path, capsys):
    missing = str(tmp_path / "nothing")
    code, _, err = _exit(_main(module), MISTAKES[module](missing), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert missing in err[0] and "Traceback" not in err[0], err


@pytest.mark.parametrize("module", list(PARSE_MISTAKES))
def test_a_parsing_mistake_is_the_usage_and_one_error_line(module, capsys):
    code, _, err = _exit(_main(module), PARSE_MISTAKES[module], capsys)
    assert code == 2 and err[0].startswith(f"usage: python -m {module} "), err
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and "nothing" in errors[0], err


@pytest.mark.parametrize("module", list(MISTAKES))  # Each has a required argument.
def test_missing_arguments_name_the_program(module, capsys):
    code, out, err = _exit(_main(module), [], capsys)
    assert code == 2 and out == "" and err[0].startswith(f"usage: python -m {module} "), err
    assert err[-1].startswith("error: ") and "evals.python" not in "".join(err), err


@pytest.mark.parametrize("module", MODULES)
def test_help_exits_0_and_names_the_program(module, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # The harness hands sys.argv to lm-eval.
    code, out, err = _exit(_main(module), ["--help"], capsys)
    # lm-eval's parser names itself whatever argv[0] says.
    prog = "lm-eval" if module == "backpack_jax.evals.harness" else f"python -m {module}"
    assert code == 0 and err == [] and prog in out, out


def test_help_shows_the_defaults_it_has(capsys):
    code, out, _ = _exit(_main("backpack_jax.generate"), ["--help"], capsys)
    assert code == 0 and "tokens to generate (default: 50)" in " ".join(out.split())
    assert "(default: None)" not in out and "(default: False)" not in out


def test_parser_takes_the_module_name_not_the_command():
    assert cli.parser("backpack_jax.attribution", None).prog == (
        "python -m backpack_jax.attribution")
    with pytest.raises(ValueError, match="dotted module name"):
        cli.parser("python -m backpack_jax.attribution", None)


def test_run_writes_json_and_turns_user_errors_into_one_line(tmp_path, capsys):
    p = cli.parser("backpack_jax.example", None)
    path = tmp_path / "out.json"
    result = cli.run(p, ["--checkpoint", "C", "--json", str(path)], lambda args: {"x": 1.5})
    assert result == {"x": 1.5} and json.loads(path.read_text()) == {"checkpoint": "C", "x": 1.5}
    assert capsys.readouterr().out == f"wrote {path}\n"

    def bad(args: argparse.Namespace):
        raise ValueError("the value is bad")

    code, out, err = _exit(lambda argv: cli.run(p, argv, bad), ["--checkpoint", "C"], capsys)
    assert (code, out, err) == (2, "", ["error: the value is bad"])
    # --json's directory is checked before any work.
    code, _, err = _exit(lambda argv: cli.run(p, argv, pytest.fail),
                         ["--checkpoint", "C", "--json", str(tmp_path / "no" / "x.json")], capsys)
    assert code == 2 and err[-1] == f"error: --json {tmp_path / 'no' / 'x.json'}: directory " \
                                    f"{tmp_path / 'no'} does not exist", err

    def bug(args: argparse.Namespace):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        cli.run(p, ["--checkpoint", "C"], bug)


def test_require_names_the_extra():
    with pytest.raises(cli.MissingExtraError, match=r"the demo needs the Python package "
                                                    r"'no_such_module', which is not installed: "
                                                    r"pip install 'backpack-jax\[demo\]'"):
        cli.require("no_such_module", "the demo", extra="demo")


def test_table_prints_an_unmeasured_cell_as_na():
    table = cli.Table("title", ["measured", "not measured"])
    table.add("row", [1.0, None])
    cells = [c.strip() for c in table.format().splitlines()[3].split("|")]
    assert cells == ["row", "1.000", "n/a"]
    assert table.to_json()["rows"]["row"] == {"measured": 1.0, "not measured": None}
