"""`mqttd assets`: the deployment files ship inside the package, byte for byte the repository's
deploy/ files, for hosts that installed mqttd with pip."""
from __future__ import annotations

import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path

import mqttd.assets
from mqttd.assets import ASSETS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(mqttd.assets.__file__).parent


def mqttd_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mqttd", *args], capture_output=True, timeout=60)


def test_list_names_every_shipped_asset():
    r = mqttd_cli("assets", "--list")

    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert [line.split()[:2] for line in lines] == [[a.name, a.filename] for a in ASSETS]
    assert {a.name for a in ASSETS} == {"systemd", "logrotate", "alerts", "alerts-test", "dashboard"}
    assert mqttd_cli("assets").stdout == r.stdout          # no NAME: the list


def test_each_asset_prints_exactly_the_file_in_deploy():
    for asset in ASSETS:
        for name in (asset.name, asset.filename):
            r = mqttd_cli("assets", name)
            assert r.returncode == 0, r.stderr
            assert r.stdout == (ROOT / asset.repo_path).read_bytes(), name
            assert r.stdout == (PACKAGE_DIR / asset.filename).read_bytes(), name


def test_deploy_holds_the_package_files_themselves():
    """The package copy is the source; in the repository deploy/ links to it, so the two cannot
    drift apart (an unpacked sdist may hold plain copies: then they must be identical)."""
    for asset in ASSETS:
        in_repo = ROOT / asset.repo_path
        if (ROOT / ".git").exists():
            assert in_repo.is_symlink(), f"{asset.repo_path} should link to mqttd/assets/{asset.filename}"
            assert in_repo.resolve() == (PACKAGE_DIR / asset.filename).resolve()
        assert in_repo.read_bytes() == (PACKAGE_DIR / asset.filename).read_bytes(), asset.repo_path
    shipped = {p.name for p in PACKAGE_DIR.iterdir() if p.is_file() and p.suffix != ".py"}
    assert shipped == {a.filename for a in ASSETS}


def test_the_assets_are_declared_as_package_data():
    """What setuptools puts in the wheel and the sdist: every asset matches a package-data pattern."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["mqttd.assets"]
    for asset in ASSETS:
        assert any(fnmatch.fnmatch(asset.filename, p) for p in patterns), asset.filename


def test_an_unknown_asset_exits_2_with_the_list():
    r = mqttd_cli("assets", "nginx")

    assert r.returncode == 2
    assert r.stdout == b""
    err = r.stderr.decode()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "unknown asset 'nginx'" in err
    for asset in ASSETS:
        assert asset.name in err
