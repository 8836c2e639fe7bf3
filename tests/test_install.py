"""A fresh machine: no project name shadows an installed distribution, and the locks match pyproject.toml.

    python -m pytest tests/test_install.py -q

`import X` run from the project root finds the project's X first: a top-level module or package named
like an import that an installed distribution provides hides that distribution from everything that
imports it (transformers 5 imports the `kernels` distribution whenever it loads a model class).
"""
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def top_level_names(root: Path) -> set:
    """The names `import X` resolves to the project from its root: X.py files and packages X/__init__.py."""
    return ({p.stem for p in root.glob("*.py")}
            | {p.parent.name for p in root.glob("*/__init__.py")})


def shadowed(root: Path) -> dict:
    """{project name: the installed distributions whose import of that name it hides}."""
    provided = metadata.packages_distributions()
    return {n: sorted(set(provided[n])) for n in sorted(top_level_names(root)) if n in provided}


def test_no_project_name_shadows_an_installed_distribution():
    found = shadowed(ROOT)
    assert not found, ("rename these: `import X` from the project root finds the project's file instead of the "
                       f"installed distribution: {found}")


def test_the_shadowing_check_catches_a_module_named_like_a_distribution(tmp_path):
    """The check above is live: a project with a yaml.py or a tqdm/ package beside its own modules fails it."""
    (tmp_path / "minimind.py").write_text("")
    (tmp_path / "yaml.py").write_text("")
    (tmp_path / "tqdm").mkdir()
    (tmp_path / "tqdm" / "__init__.py").write_text("")
    found = shadowed(tmp_path)
    assert found == {"tqdm": ["tqdm"], "yaml": ["PyYAML"]}, found


def locked(path: Path) -> dict:
    """{normalised name: {versions}} of a hashed requirements lock (one version per Python marker)."""
    pins = {}
    for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", path.read_text(encoding="utf-8"), re.M):
        pins.setdefault(norm(m.group(1)), set()).add(m.group(2))
    return pins


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extra=None) -> list:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return [norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in reqs]


def test_the_locks_pin_every_declared_dependency_with_hashes():
    """requirements.txt locks the pipeline's dependencies, requirements-test.txt the tests' as well, at the
    same versions; torch stays out of both (its build is the machine's choice) and every pin has a hash."""
    run, test = locked(ROOT / "requirements.txt"), locked(ROOT / "requirements-test.txt")
    for name in declared():
        if name != "torch":
            assert name in run, f"{name} is declared in pyproject.toml but not locked: bash .ci/lock"
    for name in declared("test"):
        assert name in test, f"{name} is declared in pyproject.toml but not locked: bash .ci/lock"
    for name, versions in run.items():
        assert versions <= test.get(name, set()), f"{name}: requirements.txt and requirements-test.txt disagree"
    assert "torch" not in run and "torch" not in test
    for path in ("requirements.txt", "requirements-test.txt"):
        text = (ROOT / path).read_text(encoding="utf-8")
        blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
        assert all("--hash=sha256:" in b for b in blocks if b.strip() and not b.startswith("#")), path


def test_readme_and_ci_install_the_locked_torch():
    """One torch version everywhere: pyproject.toml's pin is what the README and .ci/run install."""
    pin = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if r.startswith("torch=="))
    for path in ("README.md", ".ci/run"):
        assert f"pip install {pin}" in (ROOT / path).read_text(encoding="utf-8"), f"{path} does not install {pin}"


def missing_from_lock(lock: dict, installed=metadata.distributions) -> dict:
    """{locked package: [what it requires here that the lock leaves out]}, read from the installed metadata
    with this machine's markers (no extras); torch and its CUDA runtime are the machine's own choice."""
    from packaging.requirements import Requirement
    missing = {}
    for dist in installed():
        name = norm(dist.metadata["Name"] or "")
        if name not in lock:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = norm(req.name)
            if dep not in lock and dep != "torch" and not re.match(r"(nvidia|cuda)-(?!ml-py)", dep):
                missing.setdefault(name, []).append(dep)
    return missing


def test_every_locked_package_finds_its_own_requirements_in_the_lock():
    """`pip install --require-hashes -r requirements-test.txt` on a clean machine fails when a locked package
    needs one the lock left out (it happened: swanlab's nvidia-ml-py was excluded with torch's CUDA runtime)."""
    lock = locked(ROOT / "requirements-test.txt")
    missing = missing_from_lock(lock)
    assert not missing, f"the lock leaves out what these need (regenerate with bash .ci/lock): {missing}"
    without = {n: v for n, v in lock.items() if n != "nvidia-ml-py"}
    if "swanlab" in lock:  # the check is live: the lock that failed CI fails it
        assert missing_from_lock(without) == {"swanlab": ["nvidia-ml-py"]}
