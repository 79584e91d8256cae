"""Configuration errors: every bad config fails before any work, with a message that names
the field, the bad value and what is allowed. Real YAML files, real pydantic, real CLI."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import digits_config

from tlops.config import (
    PipelineConfig,
    apply_overrides,
    load_config,
    parse_override,
    validate_config,
)
from tlops.errors import ConfigError, TlopsError

TLOPS = Path(sys.executable).parent / "tlops"


def _invalid(raw, origin: str = "cfg.yaml") -> str:
    with pytest.raises(ConfigError) as excinfo:
        validate_config(raw, origin)
    return str(excinfo.value)


@pytest.fixture
def raw(tmp_path) -> dict:
    return digits_config(tmp_path / "work")


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------- valid configs / defaults


def test_valid_config_fills_defaults(raw):
    cfg = validate_config(raw)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.train.epochs == 1
    assert cfg.train.lr == pytest.approx(1e-3)  # default
    assert cfg.features.batch_size == 64  # whole section defaulted
    assert cfg.data.split.val == pytest.approx(0.2) and cfg.data.split.test == pytest.approx(0.3)
    assert cfg.register.model_name == "t-digits"


def test_config_error_is_a_tlops_error():
    assert issubclass(ConfigError, TlopsError)


def test_single_strategy_string_becomes_list(raw):
    raw["train"]["strategies"] = "fine-tune"
    assert validate_config(raw).train.strategies == ["fine-tune"]


# ---------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_lists_allowed_keys(raw):
    raw["trian"] = {"epochs": 3}
    msg = _invalid(raw)
    assert msg.startswith("invalid config cfg.yaml:")
    assert (
        "trian: unknown key; allowed keys: data, evaluate, features, kubernetes, name, register, seed, source, "
        "tracking, train, tune, workdir" in msg
    )


def test_unknown_nested_key_names_full_path_and_allowed_keys(raw):
    raw["train"]["epoch"] = 3
    msg = _invalid(raw)
    assert "train.epoch: unknown key; allowed keys: " in msg
    line = next(ln for ln in msg.splitlines() if "train.epoch:" in ln)
    allowed = line.split("allowed keys: ", 1)[1].split(", ")
    assert "epochs" in allowed
    assert allowed == sorted(allowed)
    assert set(allowed) == set(PipelineConfig.model_fields["train"].annotation.model_fields)


def test_unknown_key_two_levels_deep(raw):
    raw["data"]["split"]["tst"] = 0.1
    msg = _invalid(raw)
    assert "data.split.tst: unknown key; allowed keys: test, val" in msg


def test_unknown_key_in_gates(raw):
    raw["evaluate"]["gates"] = {"min_acc": 0.5}
    msg = _invalid(raw)
    assert (
        "evaluate.gates.min_acc: unknown key; allowed keys: gain_bound, min_accuracy, min_gain_over_scratch, "
        "must_beat_champion" in msg
    )


# ---------------------------------------------------------------- wrong types / values


def test_wrong_type_names_field_and_bad_value(raw):
    raw["train"]["epochs"] = "abc"
    msg = _invalid(raw)
    assert "train.epochs: got 'abc': " in msg
    assert "valid integer" in msg


def test_bad_literal_lists_allowed_values(raw):
    raw["train"]["strategies"] = ["bogus"]
    msg = _invalid(raw)
    assert "train.strategies.0: got 'bogus': " in msg
    assert "'linear-probe'" in msg and "'fine-tune'" in msg


def test_bad_literal_in_data_format(raw):
    raw["data"]["format"] = "parquet"
    msg = _invalid(raw)
    assert "data.format: got 'parquet': " in msg
    for allowed in ("'auto'", "'image-folder'", "'npz'", "'csv'", "'tsv'", "'sklearn'"):
        assert allowed in msg


def test_empty_strategies_rejected(raw):
    raw["train"]["strategies"] = []
    msg = _invalid(raw)
    assert "train.strategies: got []" in msg


def test_out_of_range_split_fraction(raw):
    raw["data"]["split"] = {"test": 1.5}
    msg = _invalid(raw)
    assert "data.split.test: got 1.5: Input should be less than 1" in msg


def test_val_plus_test_must_leave_training_data(raw):
    raw["data"]["split"] = {"val": 0.5, "test": 0.5}
    msg = _invalid(raw)
    assert "data.split: " in msg
    assert "val + test must be < 1 (got 0.5 + 0.5); nothing left to train on" in msg
    assert "Value error" not in msg  # pydantic's prefix is stripped


@pytest.mark.parametrize(
    ("section", "key", "value", "expect"),
    [
        ("train", "epochs", 0, "train.epochs: got 0: Input should be greater than or equal to 1"),
        ("train", "lr", -1.0, "train.lr: got -1.0: Input should be greater than 0"),
        ("data", "labels_per_class", 0, "data.labels_per_class: got 0: Input should be greater than or equal to 1"),
        ("data", "image_size", 2, "data.image_size: got 2: Input should be greater than or equal to 4"),
        ("data", "unlabelled", 1.0, "data.unlabelled: got 1.0: Input should be less than 1"),
    ],
)
def test_out_of_range_values(raw, section, key, value, expect):
    raw[section][key] = value
    assert expect in _invalid(raw)


def test_bad_name_pattern(raw):
    raw["name"] = "has spaces"
    msg = _invalid(raw)
    assert "name: got 'has spaces': String should match pattern" in msg


def test_all_errors_reported_at_once(raw):
    raw["train"]["epochs"] = "abc"
    raw["train"]["epoch"] = 3
    raw["data"]["split"] = {"test": 1.5}
    msg = _invalid(raw)
    lines = msg.splitlines()
    assert lines[0] == "invalid config cfg.yaml:"
    assert any(ln.startswith("  train.epochs: got 'abc'") for ln in lines)
    assert any(ln.startswith("  train.epoch: unknown key") for ln in lines)
    assert any(ln.startswith("  data.split.test: got 1.5") for ln in lines)


# ---------------------------------------------------------------- missing required fields


def test_missing_required_nested_field(raw):
    del raw["register"]["model_name"]
    assert "register.model_name: required field is missing" in _invalid(raw)


def test_data_needs_exactly_one_of_source_and_dvc(raw):
    del raw["data"]["source"]
    line = _invalid(raw).splitlines()[1]
    assert line.startswith("  data: got {")
    assert line.endswith(
        ": set exactly one of data.source (a path, s3:// URI or sklearn:<name>) "
        "and data.dvc (repo, rev, path of a DVC-versioned dataset)"
    )


def test_missing_required_section(raw):
    del raw["source"]
    assert "\n  source: required field is missing" in _invalid(raw)


def test_missing_register_section(raw):
    del raw["register"]
    assert "register: required field is missing" in _invalid(raw)


def test_missing_register_model_name(raw):
    raw["register"] = {}
    assert "register.model_name: required field is missing" in _invalid(raw)


# ---------------------------------------------------------------- overrides


def test_overrides_parse_yaml_types(tmp_path, raw):
    path = _write(tmp_path / "cfg.yaml", raw)
    cfg = load_config(
        path,
        [
            "train.epochs=3",
            "train.lr=0.5",
            "train.strategies=[linear-probe, fine-tune]",
            "train.augment=true",
            "data.split.val=0.1",
            "seed=7",
            "features.cache_dir=/tmp/x",
        ],
    )
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == pytest.approx(0.5)
    assert cfg.train.strategies == ["linear-probe", "fine-tune"]
    assert cfg.train.augment is True
    assert cfg.data.split.val == pytest.approx(0.1)
    assert cfg.data.split.test == pytest.approx(0.3)  # sibling untouched
    assert cfg.seed == 7
    assert cfg.features.cache_dir == "/tmp/x"


def test_override_creates_missing_section(tmp_path, raw):
    raw.pop("tracking", None)
    cfg = load_config(_write(tmp_path / "cfg.yaml", raw), ["tracking.experiment=exp2"])
    assert cfg.tracking.experiment == "exp2"


def test_apply_overrides_does_not_mutate_input():
    raw = {"train": {"epochs": 1}}
    before = copy.deepcopy(raw)
    out = apply_overrides(raw, ["train.epochs=5", "x.y.z=1"])
    assert raw == before
    assert out == {"train": {"epochs": 5}, "x": {"y": {"z": 1}}}


def test_override_value_with_equals_sign():
    assert parse_override("name=a=b") == (["name"], "a=b")


def test_override_without_equals_is_config_error(tmp_path, raw):
    path = _write(tmp_path / "cfg.yaml", raw)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, ["train.epochs"])
    assert str(excinfo.value) == "override 'train.epochs' must look like key.path=value (e.g. train.epochs=3)"


@pytest.mark.parametrize("item", ["=3", "train..epochs=3", ".epochs=3"])
def test_override_empty_key(item):
    with pytest.raises(ConfigError, match="has an empty key"):
        parse_override(item)


def test_override_invalid_yaml_value():
    with pytest.raises(ConfigError, match=r"override 'train.strategies=\[x': value is not valid YAML"):
        parse_override("train.strategies=[x")


def test_override_into_scalar_is_not_a_section():
    with pytest.raises(ConfigError) as excinfo:
        apply_overrides({"seed": 0}, ["seed.x=1"])
    assert str(excinfo.value) == "override 'seed.x=1': 'seed' is not a section"


def test_override_with_bad_value_is_validated(tmp_path, raw):
    path = _write(tmp_path / "cfg.yaml", raw)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, ["train.epochs=abc"])
    assert f"invalid config {path}:" in str(excinfo.value)
    assert "train.epochs: got 'abc'" in str(excinfo.value)


def test_override_with_unknown_key_is_validated(tmp_path, raw):
    path = _write(tmp_path / "cfg.yaml", raw)
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key; allowed keys: .*epochs"):
        load_config(path, ["train.epoch=3"])


# ---------------------------------------------------------------- file-level errors


def test_config_path_is_a_directory(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path)
    assert str(excinfo.value) == f"config file not found: {tmp_path}"


def test_config_path_missing(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("name: x\ndata: [unclosed\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert str(excinfo.value).startswith(f"config {path} is not valid YAML: ")


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, ["train.epochs=3"])
    assert str(excinfo.value) == f"invalid config {path}: the top level must be a mapping, got list"


def test_top_level_scalar_via_validate_config():
    assert _invalid("just a string", "s.yaml") == "invalid config s.yaml: the top level must be a mapping, got str"


def test_empty_file_reports_missing_fields(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    msg = str(excinfo.value)
    for field in ("name", "data", "source"):
        assert f"\n  {field}: required field is missing" in msg


# ---------------------------------------------------------------- CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert TLOPS.exists(), f"console script not found at {TLOPS}"
    return subprocess.run([str(TLOPS), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_validate_bad_config_exits_2_and_creates_nothing(tmp_path, raw):
    raw["train"]["epoch"] = 3
    raw["train"]["epochs"] = "abc"
    cfg_file = _write(tmp_path / "bad.yaml", raw)
    workdir = Path(raw["workdir"])
    before = sorted(p.name for p in tmp_path.iterdir())
    res = _cli("validate", "--config", str(cfg_file), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"error: invalid config {cfg_file}:"), res.stderr
    assert "train.epoch: unknown key; allowed keys:" in res.stderr
    assert "train.epochs: got 'abc'" in res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    assert not workdir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .tlops, no mlruns, nothing


def test_cli_validate_bad_override_exits_2(tmp_path, raw):
    cfg_file = _write(tmp_path / "cfg.yaml", raw)
    res = _cli("validate", "--config", str(cfg_file), "--set", "train.epochs", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("error: override 'train.epochs' must look like key.path=value")
    assert not Path(raw["workdir"]).exists()


def test_cli_validate_missing_config_file_exits_2(tmp_path):
    res = _cli("validate", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: config file not found: {tmp_path / 'nope.yaml'}")


def test_cli_validate_good_config_prints_resolved_yaml(tmp_path, raw):
    del raw["evaluate"]  # let the defaults show
    cfg_file = _write(tmp_path / "good.yaml", raw)
    res = _cli("validate", "--config", str(cfg_file), "--set", "train.epochs=3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "scratch_baseline: true" in res.stdout
    resolved = yaml.safe_load(res.stdout)
    assert resolved["evaluate"]["scratch_baseline"] is True
    assert resolved["evaluate"]["ece_bins"] == 15
    assert resolved["train"]["epochs"] == 3
    assert resolved["train"]["lr"] == pytest.approx(1e-3)
    assert resolved["features"] == {"batch_size": 64, "cache_dir": None, "cache": True, "backend": "torch", "shards": 1}
    assert resolved["data"]["classes"] == [0, 1, 2]
    # the printed YAML is itself a valid config that resolves to the same thing
    assert validate_config(resolved).to_dict() == resolved
    assert not Path(raw["workdir"]).exists()
