"""The conda envs and the pip lock file pin the same versions, and the lock pins everything.

That every rule logs and names a conda env is `snakemake --lint`'s job (run by `make lint`)."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO

# conda-forge names that differ from PyPI names
CONDA_TO_PIP = {"pytorch": "torch", "matplotlib-base": "matplotlib", "huggingface_hub": "huggingface-hub"}


def lock_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_lock_line_is_an_exact_pin():
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), line


def test_direct_requirements_are_in_the_lock_at_the_same_version():
    pins = lock_versions()
    for line in (REPO / "requirements.in").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert pins.get(name.lower()) == version, f"requirements.in {line} vs lock {pins.get(name.lower())}"


def test_conda_envs_agree_with_the_lock():
    pins = lock_versions()
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        assert spec["channels"] == ["conda-forge", "nodefaults"], env.name
        for dependency in spec["dependencies"]:
            assert isinstance(dependency, str), f"{env.name}: no pip: sections (not pinned by conda pin files)"
            name, version = dependency.split("=", 1)
            if name == "python":
                assert version == "3.11"
                continue
            pip_name = CONDA_TO_PIP.get(name, name)
            assert pins.get(pip_name) == version, f"{env.name}: {dependency} but the lock has {pins.get(pip_name)}"
