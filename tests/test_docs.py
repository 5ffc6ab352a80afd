"""The docs a clone ships: its design document is inside the repository, and what README says
about the default pipeline's groups is what configs/default.yaml does."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "bench" / "data" / "README.md"]


def test_the_design_document_is_in_the_repository_and_the_docs_link_to_it() -> None:
    design = ROOT / "copilot" / "DESIGN.md"
    assert design.is_file()
    assert "\n## Signals, cues and game state\n" in design.read_text()
    for doc in DOCS:
        text = doc.read_text()
        assert "shared/DESIGN.md" not in text, doc
        links = re.findall(r"\]\(([^)#]+)\)", text)
        assert any(link.endswith("copilot/DESIGN.md") for link in links), doc
        for link in links:
            if "://" not in link:
                assert (doc.parent / link).resolve().is_file(), (doc, link)


def test_readme_places_the_default_stages_as_the_config_does() -> None:
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    groups: dict[str, list[str]] = {}
    for stage in config["stages"]:
        groups.setdefault(stage["placement"]["group"], []).append(stage["name"])
    readme = " ".join((ROOT / "README.md").read_text().split())
    for group, names in groups.items():
        said = re.search(rf"`{group}` \(([^)]*)\)", readme)
        assert said, group
        for name in names:
            if name not in ("events", "features", "advice", "console"):  # "the sinks and the console"
                assert name in said.group(1), (group, name, said.group(1))
