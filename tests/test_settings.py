"""Settings as the one source: the CLI's flags and the Python API's keywords are derived from the settings
dataclasses (same defaults), no front-end module repeats a literal default, and every invalid value is a
ValueError naming the parameter from Python and a one-line error naming the flag from the CLI."""

import ast
import dataclasses
import inspect
import pathlib

import pytest

import sparse_expansion
from sparse_expansion import api
from sparse_expansion.cli.main import COMMANDS
from sparse_expansion.cli.parser import flag_of
from sparse_expansion.settings import AtLeast, Each, Interval, OneOf, Positive, SettingError

SRC = pathlib.Path(sparse_expansion.__file__).parent


def _cli_fields():
    """(command, settings class, field, required fields of its group) for every field on the command line."""
    for command in COMMANDS.values():
        for group in command.groups:
            for field in group.fields():
                yield command, group, field


def _bad_value(check):
    """A value the check refuses, found from its rule (not from the code under test's messages)."""
    if isinstance(check, AtLeast):
        return type(check.low)(check.low - 1) if isinstance(check.low, int) else check.low - 1.0
    if isinstance(check, Positive):
        return 0
    if isinstance(check, Interval):
        return check.high + 1
    if isinstance(check, OneOf):
        return "not-a-choice"
    if isinstance(check, Each):
        return (_bad_value(check.check),)
    return None


def _checked_fields():
    seen = set()
    for command, group, field in _cli_fields():
        key = (group.settings, field.name)
        check = field.metadata["check"]
        if key in seen or _bad_value(check) is None:
            continue
        seen.add(key)
        yield pytest.param(command, group, field, id=f"{command.name}-{group.settings.__name__}.{field.name}")


def test_every_settings_default_appears_once_and_the_front_ends_agree():
    parser = sparse_expansion.cli.build_parser()
    for command, group, field in _cli_fields():
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        # The parser carries no default of its own (argparse.SUPPRESS): an omitted flag takes the dataclass's.
        sub = parser._subparsers._group_actions[0].choices[command.name]
        action = next(a for a in sub._actions if a.dest in (field.name, f"no_{field.name}"))
        assert action.default in (None, False, "==SUPPRESS=="), (command.name, field.name, action.default)
        if default not in (None, False, True, (), ""):
            shown = default * field.metadata["scale"] if field.metadata["scale"] != 1 else default
            text = ",".join(map(str, shown)) if isinstance(shown, tuple) and not isinstance(shown[0], tuple) else None
            assert "default" in action.help and (text is None or text in action.help), (command.name, field.name)
    for function, classes in ((api.prune, ("RunSettings", "PruneSettings", "PruneOptions")),
                              (api.expand, ("RunSettings", "ExpansionConfig", "PruneSettings", "PruneOptions"))):
        parameters = inspect.signature(function).parameters
        for command, group, field in _cli_fields():
            if group.settings.__name__ in classes and field.name in parameters:
                default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
                assert parameters[field.name].default == default, (function.__name__, field.name)


def test_no_literal_default_in_the_front_ends():
    """cli/ and api.py take every default from the settings: no argparse default, no literal keyword default for a
    settings field."""
    names = {f.name for _, _, f in _cli_fields()} | {"eval", "evaluate"}
    for path in [*sorted((SRC / "cli").glob("*.py")), SRC / "api.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "default" and isinstance(keyword.value, ast.Constant):
                        assert keyword.value.value is None, f"{path.name}:{node.lineno} default={keyword.value.value}"
            if isinstance(node, ast.FunctionDef):
                args = node.args
                for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
                    if arg.arg in names and isinstance(default, ast.Constant) and default.value is not None:
                        pytest.fail(f"{path.name}:{node.lineno} {arg.arg}={default.value!r} repeats a setting")


@pytest.mark.parametrize(("command", "group", "field"), list(_checked_fields()))
def test_an_invalid_value_names_the_parameter_in_python_and_the_flag_in_the_cli(command, group, field, tmp_path,
                                                                                  capsys):
    bad = _bad_value(field.metadata["check"])
    with pytest.raises(ValueError, match=rf"\b{field.name}\b") as raised:
        group.settings(**{field.name: bad})
    assert isinstance(raised.value, SettingError) and raised.value.parameter == field.name

    flag = flag_of(field)
    scale = field.metadata["scale"]
    text = ",".join(map(str, bad)) if isinstance(bad, tuple) else str(bad if scale == 1 else bad * scale)
    required = []
    for g in command.groups:
        for name in g.required:
            required += {"out": ["--out", str(tmp_path / "out")], "prompt": ["--prompt", "x"]}[name]
    extra = ["--kernel"] if command.name == "bench" and field.name != "kernel" else []
    capsys.readouterr()
    try:
        code = sparse_expansion.cli.main([command.name, *required, *extra, flag, text])
    except SystemExit as exc:  # argparse's own refusals (choices, types): the same one-line form
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert flag in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "value"), [
    ("min_cluster_tokens", 0),
    ("experts", 0),
    ("selective", 1.5),
    ("method", "magnitude"),  # a data-free method would give k identical experts
    ("kmeans_init", "none"),
    ("blocksize", 0),
    ("percdamp", 0.0),
    ("bits", 9),
    ("seqlen", 1),
    ("calib_samples", 0),
    ("bos", "sometimes"),
    ("sparsity", 1.0),
])
def test_python_callers_get_a_value_error_naming_the_parameter(name, value, tmp_path):
    """Through the API itself, before any model is loaded or anything written."""
    settings = {"sparsity": 0.5, name: value}
    with pytest.raises(ValueError, match=rf"^{name} "):
        sparse_expansion.expand(None, out=tmp_path / "out", **settings)
    assert not any(tmp_path.iterdir())


def test_the_api_refuses_an_unknown_keyword_and_an_invalid_value_before_any_work():
    with pytest.raises(TypeError, match="experts_count"):
        sparse_expansion.expand(None, experts_count=4, sparsity=0.5)
    with pytest.raises(ValueError, match="^min_cluster_tokens must be at least 1, got 0"):
        sparse_expansion.expand(None, min_cluster_tokens=0, sparsity=0.5)


def test_the_cli_names_the_flag_of_a_scaled_setting(capsys, tmp_path):
    """--selective takes a percentage of rows; Python's `selective` a fraction: each error in its own unit."""
    argv = ["expand", "--sparsity", "0.5", "--selective", "150", "--out", str(tmp_path / "o")]
    code = sparse_expansion.cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "--selective must be a share of rows in (0, 100], got 150" in err
    with pytest.raises(ValueError, match=r"selective must be a share of rows in \(0, 1\], got 1.5"):
        sparse_expansion.api.ExpansionConfig(selective=1.5)
