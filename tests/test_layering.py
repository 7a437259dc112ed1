"""The package's shape: dependencies point one way, and only the agent layer touches the model's internals."""

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fedse"
LAYERS = [
    "envs",
    "agent",
    "evolve",
    "fl",
    "experiments",
    "flower",
    "doc_tables",
    "cli",
]  # each may import only those before it
LEAVES = {
    "files",
    "seeds",
    "progress",
    "process",
    "sections",
    "errors",
    "run_options",
}  # import nothing of fedse's but errors


def imports(path: Path) -> list[str]:
    return re.findall(r"^\s*(?:from|import) fedse\.(\w+)", path.read_text(), re.M)


def test_dependencies_point_one_way():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        part = path.relative_to(SRC).parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        for target in imports(path):
            if part in LEAVES:
                ok = target == "errors"
            else:
                ok = target in LEAVES or LAYERS.index(target) <= LAYERS.index(part)
            if not ok:
                wrong.append(f"{path.relative_to(SRC)} imports fedse.{target}")
    assert wrong == []
    assert len(list(SRC.rglob("*.py"))) > 40  # the walk really saw the package


def test_only_the_agent_layer_touches_peft_and_hf_internals():
    pattern = re.compile(r"import peft|from peft|\.peft\b|_attn_implementation|\.base\.model\b")
    outside = [
        f"{path.relative_to(SRC)}:{number}"
        for path in sorted(SRC.rglob("*.py"))
        if path.relative_to(SRC).parts[0] != "agent"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert outside == []
    assert pattern.search((SRC / "agent" / "policy.py").read_text())  # the pattern finds what it looks for
