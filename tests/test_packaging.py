"""pyproject.toml: the console command is run_pipeline's main; its dependencies are requirements.txt's."""
import importlib.metadata
import tomllib
from pathlib import Path

import run_pipeline

REPO = Path(__file__).resolve().parent.parent


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_console_command_is_the_same_main_as_run_pipeline():
    scripts = project()["project"]["scripts"]
    assert list(scripts) == ["feature-pipeline"]
    entry = importlib.metadata.EntryPoint("feature-pipeline", scripts["feature-pipeline"], "console_scripts")
    assert entry.load() is run_pipeline.main  # what pip's generated wrapper calls
    assert project()["tool"]["setuptools"]["py-modules"] == ["run_pipeline"]


def test_dependencies_are_the_requirements_ranges():
    lines = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    meta = project()["project"]
    assert sorted(meta["dependencies"]) == sorted(ln for ln in lines if not ln.startswith("pytest"))
    assert meta["optional-dependencies"]["test"] == [ln for ln in lines if ln.startswith("pytest")]
    assert all(any(op in d for op in (">=", "<", "==")) for d in meta["dependencies"])  # ranges, not bare names


def test_the_package_and_its_demo_photos_are_included():
    setuptools = project()["tool"]["setuptools"]
    assert setuptools["packages"]["find"]["include"] == ["pipeline", "pipeline.*"]
    (pattern,) = setuptools["package-data"]["pipeline"]
    shipped = {p.relative_to(REPO / "pipeline").as_posix() for p in (REPO / "pipeline").glob(pattern) if p.is_file()}
    assert "demo_data/flowers/SOURCE.md" in shipped and len([s for s in shipped if s.endswith(".jpg")]) == 400


def test_without_a_params_file_the_cli_uses_the_defaults(tmp_path, monkeypatch, capsys):
    """The console command runs from any folder: no ./params.json means the built-in defaults."""
    monkeypatch.chdir(tmp_path)
    assert run_pipeline.main(["head", "--set", "head.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "head.lr: must be > 0" in err and "params file" not in err
    assert run_pipeline.main(["--params", "missing.json", "head"]) == 2
    assert "cannot read params file 'missing.json'" in capsys.readouterr().err
