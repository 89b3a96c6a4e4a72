from pathlib import Path

import pytest
from typer.testing import CliRunner

from distseg.cli import app
from distseg.config import ConfigError, DataConfig, build_config, flatten, load_config, parse_override, shipped_configs


def test_shipped_demo_loads_with_its_values():
    cfg = load_config("demo")
    assert "demo" in shipped_configs()
    assert cfg.data.source == "synthetic"
    assert cfg.edges.detector == "learned" and cfg.model.padding == "reflect" and cfg.pretrain.steps == 300
    assert cfg.pretrain.vertical_flip
    assert cfg.hierarchy.max_regions == 24


def test_dotted_overrides_are_typed():
    cfg = load_config("demo", ["hierarchy.max_regions=30", "edges.scales=[0.5,1.0]", "ray.num_cpus=2", "name=x"])
    assert cfg.hierarchy.max_regions == 30
    assert cfg.edges.scales == [0.5, 1.0]
    assert cfg.ray.num_cpus == 2 and cfg.name == "x"


def test_synthetic_palette_reaches_every_stage_that_opens_the_scenes():
    """data.palette (and the seed) go to the scenes pretraining mines and to the evaluation's splits."""
    from distseg.data.synthetic import scene_options
    from distseg.eval.evaluate import open_eval_dataset

    assert DataConfig().palette == "class"  # the dataset's default: the colour-coded scenes
    assert load_config("demo").data.palette == "shared" and load_config("maskdistill_demo").data.palette == "class"
    cfg = load_config("demo", ["data.palette=shared", "seed=3", "data.num_images=5"])
    assert scene_options(cfg) == {"num_images": 5, "image_size": 128, "seed": 3, "palette": "shared"}
    for split in ("train", "val"):
        ds = open_eval_dataset(cfg, split)
        assert (ds.palette, ds.seed, ds.split, len(ds)) == ("shared", 3, split, 5)


def test_override_null_and_strings():
    assert parse_override("edges.weights=null") == ("edges.weights", None)
    assert parse_override("data.source=folder:imgs") == ("data.source", "folder:imgs")


@pytest.mark.parametrize(
    "override, words",
    [
        ("bogus.key=1", ["bogus.key", "'bogus'", "allowed:"]),
        ("data.bogus=1", ["data.bogus", "source"]),
        ("hierarchy.max_regions=300", ["hierarchy.max_regions", "300", "less than or equal to 255"]),
        ("data.num_images=abc", ["data.num_images", "abc", "integer"]),
        ("data.palette=rainbow", ["data.palette", "rainbow", "class|shared"]),
        ("hierarchy.max_regions.x=1", ["hierarchy.max_regions", "is a value"]),
        ("data=1", ["is a section"]),
        ("noequals", ["KEY=VALUE"]),
    ],
)
def test_bad_overrides_name_key_and_value(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    for word in words:
        assert word in str(e.value), str(e.value)


def test_yaml_errors_name_file_and_key(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("_base_: demo\ndata:\n  num_images: 5\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"data\.colour.*allowed: source"):
        load_config(path)
    path.write_text("_base_: demo\ndata:\n  num_images: 5\n")
    cfg = load_config(path)
    assert cfg.data.num_images == 5 and cfg.name == "demo"  # inherited from the base
    with pytest.raises(ConfigError, match="not-a-config"):
        load_config("not-a-config")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_flatten_for_mlflow():
    flat = flatten(build_config({"data": {"num_images": 3}}).model_dump())
    assert flat["data.num_images"] == 3 and flat["hierarchy.max_regions"] == 40


def test_cli_config_show_and_errors():
    runner = CliRunner()
    ok = runner.invoke(app, ["config", "show", "demo", "data.num_images=7"])
    assert ok.exit_code == 0, ok.output
    assert "num_images: 7" in ok.output
    bad = runner.invoke(app, ["config", "show", "demo", "bogus.key=1"])
    assert bad.exit_code == 2
    assert "bogus.key" in bad.output
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "config" in top.output and "demo" in top.output


def test_the_distseg_command_is_main_so_it_installs_the_warning_handler():
    """The console script must be `cli.main` (which installs `show_warning`), not the bare Typer app."""
    import tomllib
    from importlib.metadata import entry_points

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["distseg"] == "distseg.cli:main"
    (installed,) = entry_points(group="console_scripts", name="distseg")
    assert installed.value == "distseg.cli:main"


def test_distseg_warnings_print_as_one_yellow_line_and_others_as_python_does(capsys, monkeypatch):
    import warnings

    from distseg import cli

    monkeypatch.setattr(warnings, "showwarning", cli.show_warning)  # as `distseg` (cli.main) installs it
    ingest = Path(cli.__file__).parent / "train" / "ingest.py"
    warnings.warn_explicit("3 shard file(s) not in _manifest.json left out", UserWarning, str(ingest), 78)
    assert capsys.readouterr().err.strip() == "warning: 3 shard file(s) not in _manifest.json left out"
    passed_on = []  # other libraries' warnings go to Python's own showwarning
    monkeypatch.setattr(cli, "_python_showwarning", lambda message, *args: passed_on.append(str(message)))
    warnings.warn_explicit("a library's notice", UserWarning, "/elsewhere/somelib/core.py", 12)
    assert passed_on == ["a library's notice"] and capsys.readouterr().err == ""


def test_every_registered_protocol_is_named_in_the_help_and_the_config_description():
    import typer

    from distseg.cli import app
    from distseg.config import EvaluateConfig
    from distseg.eval.protocols import PROTOCOLS

    evaluate = typer.main.get_command(app).commands["evaluate"]
    (option,) = [p for p in evaluate.params if p.name == "protocols"]
    described = EvaluateConfig.model_fields["protocols"].description
    for name in PROTOCOLS.list():
        assert name in option.help.replace(",", " ").split(), name
        assert name in described.replace(",", " ").split(), name


def test_a_folder_named_like_a_shipped_config_does_not_hide_it(tmp_path, monkeypatch):
    """`distseg demo workdir=demo` leaves a demo/ folder in the working directory; the next `distseg demo`
    must still find the shipped config, not stop with "config file not found: demo"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert load_config("demo").name == "demo"
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="'mine' is a folder, not a YAML file or a shipped config"):
        load_config("mine")


def test_renamed_data_keys_load_from_old_configs_and_overrides_with_a_warning(tmp_path):
    """pretrain.data / evaluate.data / edge_train.data became pretrain.shards / evaluate.dataset /
    edge_train.root: a checkpoint's config.yaml written before the rename, and an old override, still
    load (one FutureWarning naming the keys); one key given under both names is an error."""
    old = tmp_path / "config.yaml"
    old.write_text(
        "_base_: demo\npretrain: {data: /shards, steps: 5}\nevaluate: {data: msrc}\nedge_train: {data: /bsds}\n"
    )
    with pytest.warns(FutureWarning, match=r"pretrain.data -> pretrain.shards, evaluate.data -> evaluate.dataset"):
        cfg = load_config(old)
    assert (cfg.pretrain.shards, cfg.evaluate.dataset, cfg.edge_train.root) == ("/shards", "msrc", "/bsds")
    assert cfg.pretrain.steps == 5
    with pytest.warns(FutureWarning, match=r"'evaluate.data' is now 'evaluate.dataset'"):
        assert load_config("demo", ["evaluate.data=davis"]).evaluate.dataset == "davis"
    both = tmp_path / "both.yaml"
    both.write_text("pretrain: {data: /a, shards: /b}\n")
    with pytest.raises(ConfigError, match=r"both.yaml: 'pretrain.data' and 'pretrain.shards' are the same key"):
        load_config(both)
    assert "data" not in type(build_config({}).pretrain).model_fields  # the new names are the only fields
