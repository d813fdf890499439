"""The layers of DESIGN.md hold: a module imports only from its own layer or below, never a private
name of another package, and only the integration package imports transformers."""

import ast
from pathlib import Path

import commvq

SRC = Path(commvq.__file__).parent
# lowest first; the shared helpers (files, configs, processes, the hub check) sit with the lowest
LAYERS = [
    {"commvq", "fsutil", "config", "distributed", "hub", "spec", "rope", "data"},
    {"quant", "kernels"},
    {"codecs"},
    {"io"},
    {"integrations.hf"},
    {"pipeline", "evals"},
    {"cli"},
    {"__main__"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__version__":
        return "commvq"
    return "integrations.hf" if parts[1] == "integrations" else parts[1]


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every absolute import in a file (``import m`` gives no names)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [a.name for a in node.names]
            if node.module == "commvq":  # `from commvq import io`: the modules themselves
                out += [(f"commvq.{n}", []) for n in names]
            else:
                out.append((node.module, names))
    return out


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        name = ".".join(("commvq", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        out.append((name, path))
    return out


def test_every_package_is_placed_in_a_layer():
    assert {unit(m) for m, _ in modules()} <= set(RANK)


def test_imports_go_down_the_layers_and_name_nothing_private():
    bad = []
    for mod, path in modules():
        for target, names in imports(path):
            if not target.startswith("commvq") or unit(target) == unit(mod):
                continue
            if RANK[unit(target)] > RANK[unit(mod)]:
                bad.append(f"{mod} imports {target} (a higher layer)")
            bad += [
                f"{mod} imports {target}.{n} (private)"
                for n in names
                if n.startswith("_") and n != "__version__"
            ]
    assert not bad, "\n".join(bad)


def test_no_two_packages_import_each_other():
    edges = {
        (unit(mod), unit(t))
        for mod, path in modules()
        for t, _ in imports(path)
        if t.startswith("commvq") and unit(t) != unit(mod)
    }
    assert not [(a, b) for a, b in edges if (b, a) in edges]


def test_only_the_integration_package_imports_transformers():
    users = {
        mod
        for mod, path in modules()
        for t, _ in imports(path)
        if t.split(".")[0] == "transformers"
    }
    assert users and all(unit(m) == "integrations.hf" for m in users), sorted(users)


def test_the_checker_sees_a_violation(tmp_path):
    """The parser finds what these tests look for (a test that cannot fail is no test)."""
    bad = tmp_path / "m.py"
    bad.write_text(
        "from commvq import io\nfrom commvq.quant.em import _private\nimport transformers\n"
    )
    found = imports(bad)
    assert (
        ("commvq.io", []) in found
        and ("commvq.quant.em", ["_private"]) in found
        and ("transformers", []) in found
    )
    assert RANK[unit("commvq.io")] > RANK[unit("commvq.codecs.key_codebook")]
