"""Docs that execute: every Python block in README.md and docs/ runs, in page order (or, when marked
``<!-- docs-test: compile-only ... -->`` because it needs the Hub, compiles); every YAML and JSON block parses, and
YAML blocks holding ``reward_heads`` build a valid UPOConfig through ``trl-upo train``'s parser (unless marked
``<!-- docs-test: yaml-only ... -->``: another tool's config); relative links point to files that exist."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"(?P<marker><!-- docs-test: (?P<mode>[\w-]+)[^>]*-->\s*\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def blocks(lang: str):
    out = []
    for path in DOC_FILES:
        for m in FENCE.finditer(path.read_text()):
            if m["lang"] == lang:
                line = path.read_text()[: m.start()].count("\n") + 1
                out.append(pytest.param(m["body"], m["mode"], id=f"{path.relative_to(ROOT)}:{line}"))
    return out


def _cpu_upo_config(tmp_path, data: dict):
    from trl_upo import UPOConfig

    return UPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **data)


def test_docs_exist():
    assert len(DOC_FILES) >= 10


def python_pages():
    """One case per page with Python blocks: a page's blocks run in order in one namespace, like a reader would."""
    out = []
    for path in DOC_FILES:
        text = path.read_text()
        codes = [(m["body"], m["mode"]) for m in FENCE.finditer(text) if m["lang"] == "python"]
        if codes:
            out.append(pytest.param(codes, id=str(path.relative_to(ROOT))))
    return out


@pytest.mark.parametrize("codes", python_pages())
def test_python_blocks(codes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs_example"}
    for code, mode in codes:
        if mode == "compile-only":
            ast.parse(code)
        else:
            exec(compile(code, "<docs>", "exec"), namespace)


@pytest.mark.parametrize("code,mode", blocks("yaml"))
def test_yaml_blocks(code, mode, tmp_path):
    data = yaml.safe_load(code)
    assert isinstance(data, dict)
    if "reward_heads" in data and mode != "yaml-only":  # yaml-only: another tool's config (axolotl), parsed as YAML
        # Through `trl-upo train`'s strict parser, so a block may be a whole recipe (model, dataset, LoRA keys).
        from trl_upo.cli.train import parse

        recipe = tmp_path / "block.yaml"
        recipe.write_text(code)
        env = dict(os.environ)
        try:
            _, cfg, *_ = parse(["--config", str(recipe), "--output_dir", str(tmp_path), "--use_cpu", "true",
                                "--bf16", "false"])
        finally:  # a recipe's env: block is exported by the parser; keep the test process clean
            os.environ.clear()
            os.environ.update(env)
        assert len(cfg.head_specs) == len(data["reward_heads"])


@pytest.mark.parametrize("code,mode", blocks("json"))
def test_json_blocks(code, mode):
    json.loads(code)


@pytest.mark.parametrize("code,mode", blocks("bash"))
def test_bash_blocks_reward_heads_flags_parse(code, mode, tmp_path):
    """Command-line forms of reward_heads in the docs are valid JSON that UPOConfig accepts."""
    for line in code.splitlines():
        tokens = shlex.split(line, comments=True)
        for i, tok in enumerate(tokens[:-1]):
            if tok == "--reward_heads":
                cfg = _cpu_upo_config(tmp_path, {"reward_heads": tokens[i + 1]})
                assert cfg.head_specs


def test_relative_links_resolve():
    link = re.compile(r"\]\((?!https?://|#)([^)#]+)")
    broken = []
    for path in DOC_FILES:
        for target in link.findall(path.read_text()):
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_every_registered_head_has_a_doc_page():
    from trl_upo import registered_heads

    builtin = [n for n, cls in registered_heads().items() if cls is not None and cls.__module__.startswith("trl_upo.")]
    assert {"length", "column", "function"} <= set(builtin)
    missing = [name for name in builtin if not (ROOT / "docs" / "heads" / f"{name}.md").exists()]
    assert not missing, f"heads without docs/heads/<name>.md: {missing}"


NEEDS_DOCS = pytest.mark.skipif(importlib.util.find_spec("mkdocstrings") is None,
                                reason="needs the docs extra (mkdocstrings)")


def ci_docs_command() -> list[str]:
    """The documentation step of .ci/run, as argv (without its ``--site-dir``): the tests run CI's very command."""
    line = next(x for x in (ROOT / ".ci" / "run").read_text().splitlines() if "mkdocs build" in x)
    argv = shlex.split(line.split("NO_MKDOCS_2_WARNING=1", 1)[1].split("--site-dir")[0])
    assert argv[:4] == ["python", "-m", "mkdocs", "build"], line
    return [sys.executable, *argv[1:]]


def strict_build(cwd: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*ci_docs_command(), "--site-dir", str(site)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_ci_docs_step_is_strict_and_shows_warnings():
    """The quiet flag hides the warnings that strict mode turns into a failure: CI's step is strict and not quiet."""
    argv = ci_docs_command()
    quiet = {"--quiet", "-q"}
    assert "--strict" in argv, argv
    assert not quiet & set(argv), argv


@NEEDS_DOCS
def test_strict_build_fails_on_a_docstring_warning(tmp_path):
    """The check can fail: a tiny site built by CI's command aborts on one griffe warning (a documented parameter
    that is not in the signature) and on a broken link, and builds once both are fixed."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "mkdocs.yml").write_text(
        "site_name: t\nstrict: true\nplugins:\n  - mkdocstrings:\n      handlers:\n        python:\n"
        "          paths: [.]\n          options: {docstring_style: google}\n"
    )
    bad_doc = '"""Add.\n\n    Args:\n        x: a number.\n        y: not a parameter.\n    """'
    (tmp_path / "mod.py").write_text(f"def add(x: int) -> int:\n    {bad_doc}\n    return x\n")
    (tmp_path / "docs" / "index.md").write_text("# t\n\n::: mod.add\n")
    proc = strict_build(tmp_path, tmp_path / "site1")
    assert proc.returncode != 0 and "'y' does not appear in the function signature" in proc.stderr, proc.stderr
    good_doc = '"""Add.\n\n    Args:\n        x: a number.\n    """'
    (tmp_path / "mod.py").write_text(f"def add(x: int) -> int:\n    {good_doc}\n    return x\n")
    (tmp_path / "docs" / "index.md").write_text("# t\n\n[gone](missing.md)\n\n::: mod.add\n")
    proc = strict_build(tmp_path, tmp_path / "site2")
    assert proc.returncode != 0 and "missing.md" in proc.stderr, proc.stderr
    (tmp_path / "docs" / "index.md").write_text("# t\n\n::: mod.add\n")
    proc = strict_build(tmp_path, tmp_path / "site3")
    assert proc.returncode == 0, proc.stderr


@NEEDS_DOCS
def test_built_site_resolves_sphinx_roles_and_wraps_code(tmp_path):
    """The API reference turns the docstrings' Sphinx roles into links (docs/_ext/sphinx_roles.py): the strict build
    (CI's command, warnings shown) passes and no literal :func:/:class:/:meth: text is left; TRL's doc-builder links
    point to TRL's documentation; defaults show as values; the KTO classes have their page; code blocks wrap
    (docs/stylesheets/extra.css)."""
    site = tmp_path / "site"
    proc = strict_build(ROOT, site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    role = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj):`")
    literal = {str(p.relative_to(site)): role.findall(p.read_text()) for p in site.rglob("*.html")}
    assert not {k: v for k, v in literal.items() if v}
    heads = (site / "reference" / "heads" / "index.html").read_text()
    assert heads.count('class="autorefs autorefs-internal"') >= 5
    assert "white-space: pre-wrap" in (site / "stylesheets" / "extra.css").read_text()
    assert "stylesheets/extra.css" in (site / "index.html").read_text()
    assert not (site / "_ext").exists()
    config = (site / "reference" / "config" / "index.html").read_text()
    assert 'href="https://huggingface.co/docs/trl/dpo_trainer#trl.DPOConfig"' in config
    assert "_choice_field" not in config and "[`" not in config and "*optional*" not in config
    assert "&#39;zscore&#39;" in config or "'zscore'" in config
    kto = (site / "reference" / "kto" / "index.html").read_text()
    for name in ("UPOKTOConfig", "UPOKTOTrainer", "UPOKTOMixin"):
        assert f'id="trl_upo.{name}"' in kto, name
    assert 'href="https://huggingface.co/docs/trl/kto_trainer#trl.KTOConfig"' in kto
