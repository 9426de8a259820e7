"""The package's shape: no import cycle between its modules (deferred imports included)."""

from __future__ import annotations

import ast

from tests.helpers import ROOT


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (top level or inside functions)."""
    package = ROOT / "flowertune_llm"
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module and name != "flowertune_llm" and not module.startswith(name + "."):
                    edges[module].add(name)
    return edges


def test_the_package_has_no_import_cycle() -> None:
    edges, state, cycles = package_imports(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_light_commands_load_no_ml_stack() -> None:
    """`check`, `runs`, `certs` and every `--help` answer without torch, transformers, TRL or Flower's server."""
    import subprocess
    import sys

    code = ("import sys, flowertune_llm.cli, flowertune_llm.runs, flowertune_llm.rules, flowertune_llm.config, "
            "flowertune_llm.certs, flowertune_llm.schedule; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'flwr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_check_and_runs_commands_run_without_the_ml_stack(tmp_path) -> None:  # noqa: ANN001
    """The commands themselves, run in a fresh interpreter: `check` of the shipped config (validated inputs) and
    `runs` of a results folder load none of torch, transformers, TRL, PEFT or datasets (`check` parses the
    run config with Flower's own functions, which import parts of flwr.server; `runs` loads no Flower at all)."""
    import subprocess
    import sys

    from tests.helpers import make_run

    make_run(tmp_path, "run", rounds_done=2)
    heavy = ("torch", "transformers", "trl", "peft", "datasets")
    for argv, modules in ((["check", "--app", str(ROOT), "num-server-rounds=3"], heavy),
                          (["runs", str(tmp_path)], (*heavy, "flwr"))):
        code = (f"import sys; from flowertune_llm.cli import main; rc = main({argv!r}); "
                f"print('LOADED', sorted(m for m in {modules!r} if m in sys.modules), rc)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
        assert out.strip().splitlines()[-1] == "LOADED [] 0", (argv, out)


def test_both_app_modules_import_the_ml_stack_before_anything_else_of_the_package() -> None:
    """Flower imports the ServerApp and the ClientApp from two threads: the ML stack's lazy names must be resolved
    under one module lock (ml_stack.py) before either app module touches them."""
    for app in ("server_app", "client_app"):
        tree = ast.parse((ROOT / "flowertune_llm" / f"{app}.py").read_text())
        names = [n.names[0].name if isinstance(n, ast.Import) else n.module
                 for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert [n for n in names if n.startswith("flowertune_llm")][0] == "flowertune_llm.ml_stack", app


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    import re

    text = re.sub(r"[`*_]", lambda m: "_" if m.group() == "_" else "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_the_relative_links_of_the_readme_and_docs_resolve() -> None:
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+\s+(.*)$", file.read_text(), re.M)
                if anchor not in {github_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


#: Literals two modules spell on purpose, and why.
SHARED_LITERALS = {"config.json": "a run folder's config (rundir.CONFIG_FILE) and an HF model folder's (gguf.MODEL_CONFIG)"}


def name_literals() -> dict[str, set[str]]:
    """Every file name ("x.json") or name template (f"peft_{n}") the package spells, with the modules that spell it."""
    import re
    from collections import defaultdict

    file_name = re.compile(r"^[\w\-]+\.(json|jsonl|png|txt|csv|safetensors|gguf|toml|md)$")
    template = re.compile(r"^[\w\-.]*[A-Za-z][\w\-.]*\{\}[\w\-.]*$|^[\w\-.]*\{\}[\w\-.]*[A-Za-z][\w\-.]*$")
    found: dict[str, set[str]] = defaultdict(set)
    for path in (ROOT / "flowertune_llm").rglob("*.py"):
        module = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and file_name.match(node.value):
                found[node.value].add(module)
            elif isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
                if text.count("{}") == 1 and template.match(text):
                    found[text].add(module)
    return found


def test_no_file_name_or_name_template_is_spelt_in_two_modules() -> None:
    """One name, one place: a file name or a folder-name template written in two modules is defined twice."""
    twice = {name: sorted(modules) for name, modules in name_literals().items()
             if len(modules) > 1 and name not in SHARED_LITERALS}
    assert twice == {}
    assert name_literals()["peft_{}"] == {"flowertune_llm/rundir.py"}  # the scan sees templates
