"""A config file's models and ensembles, and what the command line's --model does to them."""

import argparse

from service.config import add_arguments, resolve

CONFIG = """
models:
  - {name: harmless, path: default}
  - {name: helpful, path: helpful}
ensembles:
  - {name: program, combine: mean, normalize: true, members: {harmless: 1.0, helpful: 1.0}}
max_queue: 128
"""


def _resolve(tmp_path, *argv):
    path = tmp_path / "serve.yaml"
    path.write_text(CONFIG)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve(parser.parse_args(["--config", str(path), *argv]), environ={})


def test_the_file_serves_its_models_and_ensembles(tmp_path):
    config = _resolve(tmp_path)
    assert [m.name for m in config.model_entries()] == ["harmless", "helpful"]
    assert [e.name for e in config.ensembles] == ["program"] and config.max_queue == 128


def test_a_command_line_model_replaces_the_files_models_and_their_ensembles(tmp_path):
    config = _resolve(tmp_path, "--model", "minilm")
    assert [m.path for m in config.model_entries()] == ["minilm"] and config.ensembles == []
    assert config.max_queue == 128  # the file's other fields stay
    config = _resolve(tmp_path, "--model", "a=minilm", "--model", "b=default")
    assert [m.name for m in config.model_entries()] == ["a", "b"] and config.ensembles == []


def test_boolean_flags_both_ways_and_over_the_environment(tmp_path):
    """`--no-warmup` / `--warmup` (argparse gives a bool) beat REWARDSERVE_WARMUP (text)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert resolve(parser.parse_args(["--no-warmup"]), environ={}).warmup is False
    assert resolve(parser.parse_args(["--warmup"]), environ={"REWARDSERVE_WARMUP": "false"}).warmup is True
    assert resolve(parser.parse_args([]), environ={"REWARDSERVE_WARMUP": "false"}).warmup is False


def test_operator_typos_are_refused_not_guessed(tmp_path):
    """A boolean that is no boolean, an emptied key secret or key file, an unknown log level and a broken
    config file stop the server with the reason: none of them may quietly mean false / no authentication."""
    import pytest

    from service.config import ServeConfig, load_file
    from service.keys import load_keys

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="REWARDSERVE_WARMUP: not a boolean: 'flase'"):
        resolve(parser.parse_args([]), environ={"REWARDSERVE_WARMUP": "flase"})
    with pytest.raises(ValueError, match="REWARDSERVE_API_KEYS is set but holds no key"):
        resolve(parser.parse_args([]), environ={"REWARDSERVE_API_KEYS": " "})
    empty = tmp_path / "keys.txt"
    empty.write_text("# rotate soon\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_keys([], str(empty))
    with pytest.raises(ValueError, match="log_level"):
        ServeConfig(log_level="verbose")
    broken = tmp_path / "serve.yaml"
    broken.write_text("port: [1\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_file(broken)
    (tmp_path / "serve.json").write_text("{port: 1}")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_file(tmp_path / "serve.json")


def test_the_model_variable_replaces_the_files_models_as_the_flag_does(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(CONFIG)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = resolve(parser.parse_args(["--config", str(path)]), environ={"REWARDSERVE_MODEL": "minilm"})
    assert [m.path for m in config.model_entries()] == ["minilm"] and config.ensembles == []
    assert config.max_queue == 128
    config = resolve(parser.parse_args(["--config", str(path)]), environ={"REWARDSERVE_MODEL": "a=minilm,b=default"})
    assert [(m.name, m.path) for m in config.model_entries()] == [("a", "minilm"), ("b", "default")]


def test_the_model_flag_takes_comma_separated_entries_as_the_variable_does(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = resolve(parser.parse_args(["--model", "a=minilm,b=default"]), environ={})
    assert [(m.name, m.path) for m in config.model_entries()] == [("a", "minilm"), ("b", "default")]
    odd = tmp_path / "rm,v2"  # an existing folder with a comma in its name stays one entry
    odd.mkdir()
    config = resolve(parser.parse_args(["--model", str(odd)]), environ={})
    assert [m.path for m in config.model_entries()] == [str(odd)]
