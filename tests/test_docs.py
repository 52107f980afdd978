"""The README and docs/ stay true: links resolve, every flag and `--optim_args` key is documented with its default,
and the README's first two commands are the main job and the test suite `.ci/run` runs."""

import argparse
import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(
        f"docs_examples_glue_{name}", ROOT / "examples" / "glue" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """`text` without its fenced code blocks (links there are not rendered)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", _prose(page.read_text()), flags=re.M)}


def _table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]


def _docs_rows() -> list[list[str]]:
    return [row for page in PAGES for row in _table_rows(page.read_text())]


def _default_forms(value: Any) -> list[str] | None:
    """How a default may be written in a table's default cell; None: any non-empty cell (no value to show)."""
    if value is None or value == [] or value is dataclasses.MISSING:
        return None
    if isinstance(value, bool):
        return ["true", "on"] if value else ["false", "off"]
    if isinstance(value, float) and value.is_integer():
        return [str(int(value)), str(value)]
    if isinstance(value, Path):
        return [str(value.relative_to(ROOT)) if value.is_absolute() else str(value)]
    return [str(value)]


def _undocumented(names_and_defaults: list[tuple[list[str], Any]], rows: list[list[str]]) -> list[str]:
    """Each entry whose names have no table row (first cell naming one of them in backticks), or whose row's
    default cell does not show its default."""
    missing = []
    for names, default in names_and_defaults:
        found = [row for row in rows if len(row) > 1 and any(f"`{name}`" in row[0] for name in names)]
        forms = _default_forms(default)
        shown = [
            row for row in found if row[1] and (forms is None or any(form.lower() in row[1].lower() for form in forms))
        ]
        if not shown:
            missing.append(f"{names[0]} (default {default!r})" if found else names[0])
    return missing


def _parser_flags(parser: argparse.ArgumentParser) -> list[tuple[list[str], Any]]:
    return [
        (list(action.option_strings), action.default)
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    assert broken == []


def test_docs_link_check_catches_a_broken_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nowhere)\n```\n[in code](#ignored)\n```\n")
    targets = LINK.findall(_prose(page.read_text()))
    assert targets == ["#title", "#nowhere"]
    assert [t for t in targets if t[1:] not in _anchors(page)] == ["#nowhere"]


def test_every_optim_args_key_is_documented_with_its_default():
    from hf_galore.config import ApolloConfig, GaLoreConfig
    from hf_galore.trainer_factory import _EXTRA_OPTIM_ARGS

    text = (ROOT / "docs" / "trainer.md").read_text()
    table = text[text.index("## `--optim_args` keys") :].split("\n#", 1)[0]
    keys = [([f.name], f.default) for config in (GaLoreConfig, ApolloConfig) for f in dataclasses.fields(config)]
    keys += [([key], default) for extra in _EXTRA_OPTIM_ARGS.values() for key, default in extra.items()]
    assert _undocumented(keys, _table_rows(table)) == []


def test_every_estimate_flag_is_documented_with_its_default():
    from hf_galore_cli import estimate_command_parser

    subparsers = argparse.ArgumentParser().add_subparsers()
    estimate_command_parser(subparsers)
    (parser,) = subparsers.choices.values()
    assert _undocumented(_parser_flags(parser), _docs_rows()) == []


@pytest.mark.parametrize("script", ["compare", "sweep"])
def test_every_example_script_flag_is_documented_with_its_default(script):
    assert _undocumented(_parser_flags(_load_example(script).build_parser()), _docs_rows()) == []


def test_every_run_glue_flag_is_documented_with_its_default():
    run_glue = _load_example("run_glue")
    fields = [*dataclasses.fields(run_glue.ModelArguments), *dataclasses.fields(run_glue.DataArguments)]
    assert _undocumented([([f"--{f.name}"], f.default) for f in fields], _docs_rows()) == []


def test_undocumented_finds_a_missing_row_and_a_wrong_default():
    rows = _table_rows("| flag | default |\n|---|---|\n| `--a` | 3 |\n| `--b` | 4 |\n")
    assert _undocumented([(["--a"], 3), (["--b"], 5), (["--c"], None)], rows) == ["--b (default 5)", "--c"]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    assert text.startswith("```bash\n"), "the README must open with its set-up commands"
    block = text[len("```bash\n") : text.index("\n```", len("```bash"))]
    return [c.strip() for c in re.sub(r"\\\n\s*", "", block).splitlines() if c.strip()]


def test_readme_opens_with_the_main_job_and_the_test_suite_ci_runs():
    main_job, test_suite = _readme_commands()
    assert main_job.endswith("# main job") and "python examples/glue/compare.py" in main_job
    assert (ROOT / "examples" / "glue" / "compare.py").exists()
    assert test_suite.endswith("# test suite") and "python -m pytest" in test_suite
    ci = (ROOT / ".ci" / "run").read_text()
    extract = re.search(r"^command=\$\((.*)\)$", ci, flags=re.M).group(1)
    extracted = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert extracted.strip() == re.sub(r"\s*# test suite$", "", test_suite)
    for extra in re.findall(r'-e "\.\[(\w+)\]"', main_job + test_suite):
        assert f"\n{extra} = [" in (ROOT / "pyproject.toml").read_text(), extra
