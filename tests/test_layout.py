"""The house rules of the layout (docs/layout.md): small functions and modules, h5py only in pipeline/cache/."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(ROOT.glob("pipeline/**/*.py")) + [ROOT / "run_pipeline.py"]
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_function_over_60_lines_and_no_module_over_400():
    long_functions, long_modules = [], []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for fn in _functions(ast.parse(text)):
            if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES:
                long_functions.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}")
    assert long_functions == [] and long_modules == []


def test_h5py_is_imported_only_inside_the_cache_package():
    users = [str(p.relative_to(ROOT)) for p in SOURCES if "h5py" in _imports(ast.parse(p.read_text(encoding="utf-8")))]
    assert users and all(u.startswith("pipeline/cache/") for u in users), users


def test_the_checker_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"def f():\n{body}\n")
    assert [fn.end_lineno - fn.lineno + 1 for fn in _functions(tree)] == [MAX_FUNCTION_LINES + 1]


# ----------------------------------------------------------------------------- who may import whom
STAGE_MODULES = {f"pipeline.{s}" for s in ("extract", "head", "logistic", "finetune", "benchmark", "report", "predict")}
# Stage modules are imported by the CLI (one at a time), by the benchmark (which compares them), by the
# orchestrator (extract first when data.root's cache is missing or stale) and, for report.finish_stage,
# by the training stages.
MAY_IMPORT_STAGES = {"pipeline.benchmark": {"pipeline.extract", "pipeline.finetune", "pipeline.head",
                                            "pipeline.logistic"},
                     "pipeline.orchestrate": {"pipeline.extract"}, "pipeline.head": {"pipeline.report"},
                     "pipeline.logistic": {"pipeline.report"}, "pipeline.finetune": {"pipeline.report"},
                     "pipeline.sweep_stage": {"pipeline.report"},     # the winner's reports, as head's
                     "pipeline.leaderboard": {"pipeline.extract"},    # data.root's cache key: plan_cache, no forward
                     "pipeline.api": {"pipeline.predict"}}            # load_model's rows, as the predict stage's
FOUNDATIONS = {"pipeline", *(f"pipeline.{m}" for m in ("config", "fsutil", "metrics", "records", "runtime",
                                                        "distributed", "imagefile", "artifacts", "rundir",
                                                        "config_fields", "config_heads", "runname"))}
# runname reads the data root a features.file records, lazily, only when features.file is set
FOUNDATION_LAZY = {"pipeline.runname": {"pipeline.cache"}}
NEVER = {"pipeline.head": {"pipeline.extract", "pipeline.frozen", "pipeline.views"},     # heads never run the backbone
         "pipeline.logistic": {"pipeline.extract", "pipeline.frozen", "pipeline.views"},
         "pipeline.finetune": {"pipeline.cache", "pipeline.stream", "pipeline.orchestrate"}}  # never touches the cache


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(module: str, name: str) -> str:
    """`from module import name`: the submodule module.name when there is one, else module."""
    candidate = f"{module}.{name}"
    as_path = ROOT / candidate.replace(".", "/")
    return candidate if as_path.with_suffix(".py").is_file() or (as_path / "__init__.py").is_file() else module


def project_imports(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(module-level, lazy) imports of project modules; `if TYPE_CHECKING:` blocks are not imports."""
    top, lazy = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            found = lazy if in_function else top
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "pipeline":
                found |= {_target(child.module, a.name) for a in child.names}
            elif isinstance(child, ast.Import):
                found |= {a.name for a in child.names if a.name.split(".")[0] == "pipeline"}
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, lazy - top


def _graph() -> dict[str, tuple[set[str], set[str]]]:
    return {_module_name(p): project_imports(ast.parse(p.read_text(encoding="utf-8")))
            for p in SOURCES if p.name != "run_pipeline.py"}


def test_stage_modules_are_imported_only_where_the_layout_says():
    wrong = {m: sorted((top | lazy) & STAGE_MODULES - MAY_IMPORT_STAGES.get(m, set()) - {m})
             for m, (top, lazy) in _graph().items()}
    assert {m: s for m, s in wrong.items() if s} == {}


def test_foundations_import_only_foundations_and_the_cache_package_only_itself():
    graph = _graph()
    outside = {m: (top | lazy - FOUNDATION_LAZY.get(m, set())) - FOUNDATIONS for m, (top, lazy) in graph.items()
               if m in FOUNDATIONS}
    assert {m: sorted(found) for m, found in outside.items() if found} == {}
    allowed = {"pipeline", "pipeline.fsutil"}
    assert {m: sorted(top - allowed) for m, (top, _) in graph.items() if m.startswith("pipeline.cache")
            and {t for t in top if not t.startswith("pipeline.cache")} - allowed} == {}


def test_heads_never_import_the_backbone_path_and_finetune_never_the_cache():
    graph = _graph()
    assert {m: sorted((graph[m][0] | graph[m][1]) & banned) for m, banned in NEVER.items()} == \
        {m: [] for m in NEVER}


def test_no_import_cycles_at_module_level():
    graph = {m: top for m, (top, _) in _graph().items()}
    cycles, state = [], {}

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, set()) - {module}):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep in graph and dep not in state:
                walk(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert cycles == []


def test_the_import_checker_sees_lazy_and_type_checking_imports():
    tree = ast.parse("from pipeline import cache\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from pipeline.extract import CachePlan\ndef f():\n    from pipeline.views import read_bank\n")
    assert project_imports(tree) == ({"pipeline.cache"}, {"pipeline.views"})


# The modules that may see the whole Config: the stages' thin run_<stage> / publish layer and the
# orchestrator. Everything else (the cores: engine, probes, joint, sweep, frozen, fold, views, stream,
# selection, analysis, the cache package ...) takes its own config section, a device and a seed.
CONFIG_READERS = {f"pipeline.{m}" for m in ("config", "benchmark", "extract", "finetune", "head", "leaderboard",
                                            "logistic", "orchestrate", "predict", "report", "sweep_stage")}


def test_only_the_stage_layer_sees_the_whole_config():
    pattern = re.compile(r"from pipeline\.config import[^\n]*\bConfig\b|from pipeline\.config import \([^)]*\bConfig\b")
    readers = {_module_name(p) for p in (ROOT / "pipeline").rglob("*.py") if pattern.search(p.read_text())}
    assert readers - CONFIG_READERS == set()
