"""Which anchor each recipe setting of each 8xH200 preset follows, as a markdown table (README "Recipe anchors").

The anchors are the `# [TAG] ...` comments next to the settings in `configs/` (the tags are listed in
configs/base.py's docstring). A cell shows the preset's value, with the tag of the line that set it where a preset
overrides the recipe; the last column is the anchor of the recipe's own value. `--check FILE` exits 1 when FILE's
table differs from the configs (tests/test_preset_anchors.py keeps README in step).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys

from configs import base

PRESETS = ("stage1", "stage2", "paper_stage1", "paper_stage2", "paper_stage3", "paper_stage4")
SECTIONS = ("data", "rollout", "prompt", "env", "algo", "train", "eval", "mesh")
SKIP = {"mesh.coordinator_address", "mesh.num_processes", "mesh.process_id", "data.splits_dir", "data.val_file",
        "data.shuffle", "eval.max_entries", "data.max_entries"}
TAG = re.compile(r"#\s*(\[[A-Za-z0-9 -]+\])\s*(.*)")
BEGIN, END = "<!-- preset-anchors:begin -->", "<!-- preset-anchors:end -->"


def _flat(cfg) -> dict[str, object]:
    return {f"{s}.{k}": v for s in SECTIONS for k, v in cfg[s].items() if f"{s}.{k}" not in SKIP}


def _tagged_lines(source: str):
    """(line, '[TAG] text') for each code line, the tag from the line's own comment or else from the comment block
    right above it (a block's tag covers the settings under it)."""
    pending = None
    for line in source.splitlines():
        stripped = line.strip()
        tag = TAG.search(line)
        if stripped.startswith("#"):
            pending = pending or (tag and f"{tag.group(1)} {tag.group(2).strip()}")
            continue
        here = f"{tag.group(1)} {tag.group(2).strip()}" if tag else None
        yield line, here or pending
        pending = None


def _recipe_anchors() -> dict[str, str]:
    """section.key -> '[TAG] text' of its line in recipe() (the dict entries `key=value,  # [TAG] ...`)."""
    out, section = {}, None
    for line, tag in _tagged_lines(inspect.getsource(base.recipe)):
        m = re.match(r"\s*c\.(\w+) = dict\((.*)", line)
        if m:
            section = m.group(1)
            keys = re.findall(r"(\w+)=", m.group(2))  # a one-line dict: its tag covers all its keys
        else:
            kv = re.match(r"\s*(\w+)=", line)
            keys = [kv.group(1)] if kv else []
        for key in keys:
            if section and tag:
                out[f"{section}.{key}"] = tag
    return out


def _override_tag(preset: str, key: str, value) -> str:
    """The tag of the `c.section.key = ...` line that set `value` in `preset` (its own module first, then the
    helpers in configs/base.py); a line whose right-hand side evaluates to another value is another branch's."""
    section, name = key.split(".")
    number = int(preset[-1]) if preset.startswith("paper_stage") else 0
    scope = {**vars(base), "number": number}
    sources = [inspect.getsource(importlib.import_module(f"configs.{preset}")), inspect.getsource(base)]
    fallback = None
    for src in sources:
        for line, tag in _tagged_lines(src):
            m = re.match(rf"\s*c\.{section}\.{name} = (.*?)(\s+#.*)?$", line)
            if not m or not tag:
                continue
            fallback = fallback or tag
            try:
                if eval(m.group(1), scope) == value:  # our own config source, never model output
                    return tag.split("]")[0] + "]"
            except Exception:  # an expression over the config (c.x) cannot be evaluated here
                continue
    return (fallback or "[ours]").split("]")[0] + "]"


def _short(text: str, limit: int = 100) -> str:
    """The anchor comment up to its first sentence end, at most `limit` characters."""
    text = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _cell(value) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    return text.replace("|", "\\|")


def table() -> str:
    recipe = _flat(base.recipe())
    presets = {p: _flat(importlib.import_module(f"configs.{p}").get_config()) for p in PRESETS}
    anchors = _recipe_anchors()
    lines = ["| setting | " + " | ".join(PRESETS) + " | anchor of the recipe value |",
             "|---" * (len(PRESETS) + 2) + "|"]
    for key in sorted(recipe):
        cells = []
        for p in PRESETS:
            v = presets[p][key]
            changed = v != recipe[key]
            cells.append(_cell(v) + (f" {_override_tag(p, key, v)}" if changed else ""))
        lines.append(f"| `{key}` | " + " | ".join(cells) + f" | {_cell(_short(anchors.get(key, '(no anchor)')))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", metavar="FILE", help="exit 1 when FILE's table between the markers differs")
    args = ap.parse_args(argv)
    text = table()
    if not args.check:
        print(text)
        return 0
    doc = open(args.check).read()
    if BEGIN not in doc or END not in doc:
        print(f"{args.check}: no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    current = doc.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    if current != text:
        print(f"{args.check}: the preset-anchor table is out of date; regenerate it with "
              f"`python scripts/preset_anchors.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
