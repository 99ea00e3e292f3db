"""The folders install as one package, `moeserve.<folder>`, from a built wheel into a clean environment."""
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_clean_venv(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("moeserve-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("moeserve/kernels/model.py", "moeserve/cluster/tokenizer.py", "moeserve/actors/cli.py",
                   "moeserve/cluster/api/moeserve.proto", "moeserve/cluster/models/moeserve-demo/model.safetensors",
                   "moeserve/cluster/models/moeserve-demo-fp8/model.safetensors", "moeserve/topology/models/deepseek-v3.json"):
        assert module in names
    assert not any(n.startswith(("kernels/", "tests/")) for n in names)

    env_dir = tmp_path / "clean"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Dependencies (torch, safetensors, ...) come from this environment's site-packages through a .pth line;
    # a .pth in a plain directory is not processed, so this environment's editable moeserve stays out.
    Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", purelib, str(wheel)],
                   check=True)
    check = ("import moeserve.kernels.model, moeserve.cluster.tokenizer, moeserve.actors.cli as c, "
             "moeserve.topology; print(moeserve.kernels.model.__file__); c.build_parser()")
    out = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(purelib)
