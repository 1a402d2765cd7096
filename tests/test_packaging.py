"""What installing the project puts on sys.path, and what `import stadapter` imports."""

import subprocess
import sys

OUTSIDE_THE_REPO = "/"


def run_outside(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=OUTSIDE_THE_REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_suite_installs_as_stadapter_bench_not_a_top_level_benchmarks():
    found = run_outside("import importlib.util as u; print(u.find_spec('benchmarks') is None, "
                        "u.find_spec('stadapter.bench.runner') is not None)")
    assert found == "True True"


def test_import_stadapter_imports_no_backbone_or_training_library():
    libraries = ("open_clip", "clip", "timm", "av")
    loaded = run_outside(f"import sys, stadapter, stadapter.models; print([m for m in {libraries!r} if m in sys.modules])")
    assert loaded == "[]"
