"""The house rules of the layout (docs/layout.md): small functions and modules, h5py only in pipeline/cache/."""
import ast
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
