"""README's per-preset anchor table is the one the configs' anchor comments give, and every recipe setting of
every 8xH200 preset names an anchor."""

import os

from scripts import preset_anchors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_table_matches_the_configs():
    assert preset_anchors.main(["--check", os.path.join(ROOT, "README.md")]) == 0


def test_every_recipe_setting_names_an_anchor():
    rows = [r for r in preset_anchors.table().splitlines()[2:]]
    assert rows, "no settings listed"
    missing = [r.split("|")[1].strip() for r in rows if "(no anchor)" in r]
    assert not missing, f"settings without an anchor comment in configs/: {missing}"
    assert all(r.rstrip(" |").split("|")[-1].strip().startswith("[") for r in rows)
