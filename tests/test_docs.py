"""The documentation is checked like code.

- Generated pages (``docs/config.md`` from the config schema, ``docs/strategies.md`` from the
  strategy registry) equal what the code generates now; ``make docs`` rewrites them.
- Every shell block (```` ```bash ````, ``sh``, ``shell``, ``console``) in README.md and docs/ is
  either run here (unmarked blocks: each command must exit 0 in a scratch directory that sees the
  repo's configs), or names the tests that run it (``<!-- tested-by: tests/test_x.py::test_y -->``:
  each command's program, subcommands and options appear in one of those tests), or says what it
  needs that a developer machine does not have (``<!-- needs: cluster -->``, see ``NEEDS``).
- A YAML block preceded by ``<!-- file: NAME -->`` is written to NAME in that scratch directory
  before the document's commands run; one that is a whole pipeline config must validate.
- README.md stays under 200 lines and every relative link in README.md and docs/ resolves.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
# What a marked block needs that this machine (no cluster, no registry, no GPU) lacks.
NEEDS = {
    "cluster": "a Kubernetes cluster (kubectl context)",
    "kfp-server": "a Kubeflow Pipelines API endpoint",
    "registry": "a container registry to push to",
    "docker": "a Docker engine (root, minutes to build images)",
    "gpu": "an NVIDIA GPU",
    "your-data": "the user's own dataset or data repository",
    "network": "the package index (PyPI)",
    "long": "longer than a test may take (the slow suite, benchmarks that write bench/results)",
}
MARKER = re.compile(r"<!--\s*(needs|tested-by|file):\s*(.+?)\s*-->")
# tlops commands whose first argument is a subcommand, not a value
GROUPS = {"export", "data", "runs"}


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    text: str
    marker: tuple[str, str] | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    out, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        mk = MARKER.search(prev)
        out.append(
            Block(page, start + 1, m.group(2).lower(), "\n".join(body), (mk.group(1), mk.group(2)) if mk else None)
        )
        i += 1
    return out


def commands(block: Block) -> list[str]:
    """The command lines of a shell block as bash would run them: continuations joined, blank
    and comment-only lines (and, in ``console`` blocks, output lines) dropped."""
    text = block.text.replace("\\\n", " ")
    if block.lang == "console":
        text = "\n".join(ln[2:] for ln in text.splitlines() if ln.startswith("$ "))
    return [ln.strip() for ln in text.splitlines() if shlex.split(ln, comments=True)]


def make_recipe(target: str) -> str:
    m = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    return m.group(1) if m else ""


def key_tokens(command: str) -> list[str]:
    """What a test must contain to be said to run ``command``: for ``tlops`` its subcommand(s)
    and every option it uses (``promote``, ``--reason``); for ``make <target>`` the scripts the
    target's recipe runs (``k8s/validate.sh`` -> ``validate.sh``), else ``make <target>`` itself;
    otherwise the program and its first argument (``dvc``, ``repro``)."""
    words = shlex.split(command, comments=True)
    if words[0] == "tlops":
        sub = words[1:3] if len(words) > 2 and words[1] in GROUPS else words[1:2]
        opts = [w.split("=", 1)[0] for w in words if w.startswith("-")]
        return [*sub, *opts]
    if words[0] == "make" and len(words) == 2:
        scripts = re.findall(r"[\w./-]+\.(?:sh|py)\b", make_recipe(words[1]))
        return [Path(s).name for s in scripts] or [f"make {words[1]}"]
    return words[:2]


def all_blocks() -> list[Block]:
    return [b for p in PAGES for b in blocks(p)]


def _test_source(ref: str) -> str:
    """Source of ``tests/test_x.py::test_y`` (the function), or of a whole file (e.g. ``.ci/run``)."""
    path, _, name = ref.partition("::")
    file = REPO / path
    assert file.is_file(), f"tested-by names {path}, which does not exist"
    text = file.read_text()
    if not name:
        return text
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(text, node) or ""
    raise AssertionError(f"tested-by names {ref}, but {path} has no function {name}")


# ------------------------------------------------------------------------------- generated pages


def test_generated_pages_are_fresh():
    """What ``make docs`` writes (``python -m tlops.docgen --write docs``) equals the committed pages."""
    from tlops import docgen

    for name, make in docgen.PAGES.items():
        page = DOCS / name
        assert page.is_file(), f"docs/{name} is missing: run `make docs`"
        assert page.read_text() == make(), f"docs/{name} is stale: run `make docs`"
    assert "-m tlops.docgen --write docs" in make_recipe("docs"), "make docs must run the generator"


def test_config_reference_lists_every_field_with_type_default_and_description():
    from tlops.config import PipelineConfig
    from tlops.docgen import iter_fields

    page = (DOCS / "config.md").read_text()
    for path, field, _ in iter_fields(PipelineConfig):
        row = next((ln for ln in page.splitlines() if ln.startswith(f"| `{path}` |")), None)
        assert row is not None, f"{path} is not in docs/config.md"
        if field.description:
            assert " ".join(field.description.split()).replace("|", "\\|") in row, path
    assert "| `train.epochs` | int | `10` | fine-tune epochs (>= 1) |" in page
    assert "| `register.model_name` | str | **required** |" in page


def test_strategy_table_has_every_strategy():
    """One row per strategy, in the registry's order (the order `train.strategies` accepts)."""
    try:
        from tlops.training.strategies import names
    except ImportError:  # no registry module: the config module holds the names
        from tlops.config import STRATEGIES

        def names():
            return STRATEGIES

    page = (DOCS / "strategies.md").read_text()
    rows = [ln.split("|")[1].strip().strip("`") for ln in page.splitlines() if ln.startswith("| `")]
    assert rows == list(names())


def test_docgen_cli(tmp_path):
    from tlops import docgen

    assert docgen.main(["--write", str(tmp_path)]) == 0
    assert docgen.main(["--check", str(tmp_path)]) == 0
    (tmp_path / "config.md").write_text("old\n")
    assert docgen.main(["--check", str(tmp_path)]) == 1
    assert docgen.main(["nonsense"]) == 2


# ------------------------------------------------------------------------------- code blocks


def test_block_parsing_and_key_tokens(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "<!-- needs: cluster -->\n```bash\nkubectl apply -k x  # c\n```\n\n"
        "```console\n$ tlops runs list --host h \\\n    --experiment e\nid  name\n```\n"
        "<!-- file: c.yaml -->\n```yaml\nname: x\n```\n"
    )
    b = blocks(page)
    assert [(x.lang, x.marker, x.line) for x in b] == [
        ("bash", ("needs", "cluster"), 2),
        ("console", None, 6),
        ("yaml", ("file", "c.yaml"), 12),
    ]
    assert commands(b[1]) == ["tlops runs list --host h      --experiment e"]
    assert key_tokens(commands(b[1])[0]) == ["runs", "list", "--host", "--experiment"]
    assert key_tokens("tlops promote m 2 --reason 'x y' --force") == ["promote", "--reason", "--force"]
    assert key_tokens("make k8s-validate") == ["validate.sh"]
    assert key_tokens("make pipeline-local") == ["make pipeline-local"]
    assert key_tokens("dvc repro  # again") == ["dvc", "repro"]


def test_every_shell_block_is_run_tested_or_marked():
    problems = []
    for b in all_blocks():
        if b.lang not in SHELL:
            continue
        if b.marker is None:
            continue  # run by test_unmarked_shell_blocks_run
        kind, value = b.marker
        if kind == "needs":
            if value not in NEEDS:
                problems.append(f"{b.where}: needs '{value}' is not one of {sorted(NEEDS)}")
        elif kind == "tested-by":
            sources = [_test_source(ref.strip()) for ref in value.split(",")]
            for cmd in commands(b):
                missing = {t for t in key_tokens(cmd) if not any(t in s for s in sources)}
                if missing:
                    problems.append(f"{b.where}: no test in {value} contains {sorted(missing)} of `{cmd}`")
        else:
            problems.append(f"{b.where}: a shell block cannot be a file marker")
    assert not problems, "\n".join(problems)


def _unmarked() -> list[tuple[Path, list[Block]]]:
    return [(p, [b for b in blocks(p) if b.lang in SHELL and b.marker is None]) for p in PAGES]


@pytest.mark.parametrize("page", [p for p, bs in _unmarked() if bs], ids=lambda p: p.name)
def test_unmarked_shell_blocks_run(page, tmp_path):
    """Each command of each unmarked shell block exits 0, in order, in a scratch directory that
    sees the repo's configs, Makefile and docs (nothing the commands write lands in the repo)."""
    for name in ("configs", "docs", "Makefile", "pyproject.toml", "requirements.lock", ".venv", "components"):
        (tmp_path / name).symlink_to(REPO / name)
    for b in blocks(page):
        if b.marker and b.marker[0] == "file":
            (tmp_path / b.marker[1]).write_text(b.text + "\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for b in blocks(page):
        if b.lang not in SHELL or b.marker is not None:
            continue
        for cmd in commands(b):
            r = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, (
                f"{b.where}: `{cmd}` exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            )


def test_yaml_configs_in_docs_validate():
    from tlops.config import validate_config

    checked = 0
    for b in all_blocks():
        if b.lang != "yaml":
            continue
        raw = yaml.safe_load(b.text)
        if isinstance(raw, dict) and {"name", "data", "source", "register"} <= set(raw):
            validate_config(raw, b.where)
            checked += 1
    assert checked >= 1  # README's "use it on your data" config


# ------------------------------------------------------------------------------- README and links


def test_readme_is_short_and_says_how_to_start():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for cmd in ("make pipeline-local", "make test", "make lint"):
        assert cmd in text


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


@pytest.mark.slow
def test_dvc_lineage_example():
    """docs/data.md's end-to-end example: ``bash examples/dvc-lineage.sh`` versions a dataset on a
    local S3 API server, runs the pipeline from a fresh clone and prints the lineage tags."""
    env = {**os.environ, "MOTO_PORT": "5177"}
    r = subprocess.run(
        ["bash", "examples/dvc-lineage.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tlops.data.dvc_md5 = " in r.stdout and "tlops.data.git_rev = " in r.stdout
    assert "no credential value in any file under the workdir" in r.stdout


def test_tests_named_in_the_docs_exist():
    """`test_x.py::test_y` (and the `::test_z` shorthand after it on the same line) name real tests,
    so the reliability table and the other pages cannot point at a test that was renamed."""
    missing, seen = [], 0
    for page in PAGES:
        for line in page.read_text().splitlines():
            current = None
            for m in re.finditer(r"`(?:tests/)?(test_\w+\.py)(?:::(\w+))?|`::(\w+)", line):
                if m.group(1):
                    current = REPO / "tests" / m.group(1)
                    if not current.is_file():
                        missing.append(f"{page.name}: tests/{m.group(1)}")
                        current = None
                        continue
                name = m.group(2) or m.group(3)
                if name and current is not None:
                    seen += 1
                    if not re.search(rf"^def {name}\(", current.read_text(), re.M):
                        missing.append(f"{page.name}: {current.name}::{name}")
    assert seen >= 40 and not missing, missing
