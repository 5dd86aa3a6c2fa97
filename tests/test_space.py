"""The Space's settings: space.yaml, README.md's front matter and requirements.txt agree."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_space_settings_agree():
    space = yaml.safe_load((ROOT / "space.yaml").read_text())
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("---\n"), "README.md must open with the Space's YAML block"
    front = yaml.safe_load(readme.split("---\n")[1])
    assert front == space
    assert space["sdk"] == "gradio" and space["app_file"] == "app.py" and (ROOT / space["app_file"]).exists()
    assert str(space["python_version"]) == "3.11"
    pinned = re.search(r"^gradio==([\w.]+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert pinned and pinned.group(1) == space["sdk_version"]
    import gradio

    assert gradio.__version__ == space["sdk_version"]  # the version the tests ran against is the one Spaces installs
