"""The docs state what the code does.

* The defaults table of docs/cli.md and the "(default ...)" claims of ``bayesprune run --help``
  are compared with the configuration ``bayesprune`` (no arguments) resolves, read from the code
  (``cli.main`` -> ``cmd_run``'s resolution -> ``training.resolve_config``), never restated here.
* Every "docs/maths.md section N" cited in src/ and tests/ names a section that exists (and a
  quoted title after it is a heading of that section); nothing points at the old maths page
  outside the repository.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from bayesprune.experiments import cli
from bayesprune.experiments.data import default_data_dir
from bayesprune.experiments.training import RunConfig, criterion_of, run_dir_name

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = ROOT / "docs" / "cli.md"
MATHS_MD = ROOT / "docs" / "maths.md"
TABLE_START = "<!-- defaults of `bayesprune run`"
TABLE_END = "<!-- end of defaults -->"


# --------------------------------------------------------------------------- what the code resolves
@pytest.fixture(scope="module")
def resolved():
    """(args, config, criterion) of ``bayesprune`` with no arguments, as cmd_run resolves them."""
    captured = {}

    def fake_run(args):
        captured["args"] = args
        return 0

    original = cli.cmd_run
    cli.cmd_run = fake_run  # build_parser binds run to the module's cmd_run when main builds it
    try:
        assert cli.main([]) == 0
    finally:
        cli.cmd_run = original
    args = captured["args"]
    assert args.command == "run", "bayesprune with no arguments must mean `bayesprune run`"
    cfg = cli._resolved(args, seed=args.seeds[0])  # what cmd_run does for its first seed
    return args, cfg, criterion_of(cfg)


def _actual(option: str, args, cfg: RunConfig, crit):
    """The value `bayesprune run` uses for a command-line option."""
    dest = option.lstrip("-").replace("-", "_")
    if dest == "seeds":
        return list(args.seeds)
    if dest in ("prior_odds", "threshold"):
        assert crit is not None, f"the default method {cfg.method!r} has no rule, but the docs state {option}"
        return getattr(crit, dest)
    if dest == "out_dir":
        group = Path(args.out_dir) / run_dir_name(cfg.model, cfg.dataset, cfg.method, cfg.precision, cfg.threshold, cfg.prior_odds, cfg.kl_weighting)
        return group.parts[0]
    return getattr(cfg, dest)


def _same(stated: str, actual) -> bool:
    """``stated`` (text from the docs) names ``actual``; numbers agree to the digits written."""
    stated = stated.strip().strip("`").strip()
    if isinstance(actual, list):
        return [s for s in re.split(r"[\s,]+", stated) if s] == [str(v) for v in actual]
    if isinstance(actual, bool):
        return stated.lower() in (("on", "yes", "true") if actual else ("off", "no", "false"))
    if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            value = float(stated)
        except ValueError:
            return False
        digits = len(re.sub(r"[^0-9]", "", stated.split("e")[0]).lstrip("0")) or 1
        return math.isclose(value, float(actual), rel_tol=0.6 * 10 ** (1 - digits), abs_tol=0.0)
    return stated == str(actual)


# --------------------------------------------------------------------------- docs/cli.md's table
def _cli_md_defaults() -> dict[str, str]:
    """{option: stated default} from the marked table of docs/cli.md (first `...` of the
    default column; options joined by " / " give one row each)."""
    text = CLI_MD.read_text()
    assert TABLE_START in text and TABLE_END in text, f"{CLI_MD} lost its marked defaults table"
    block = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("|")][2:]  # header, rule
    out = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 3, f"docs/cli.md defaults row {line!r}: want | setting | option | default |"
        options = re.findall(r"`(--[a-z-]+)`", cells[1])
        values = re.findall(r"`([^`]+)`", cells[2])
        assert options and len(values) == len(options), f"docs/cli.md defaults row {line!r}: one `value` per `--option`"
        out.update(zip(options, values))
    return out


def test_cli_md_defaults_table_is_what_bayesprune_run_resolves(resolved):
    args, cfg, crit = resolved
    stated = _cli_md_defaults()
    # the settings the issue names must be in the table
    for option in ("--dataset", "--model", "--method", "--epochs", "--finetune-epochs", "--sharing", "--prior-odds", "--threshold"):
        assert option in stated, f"docs/cli.md's defaults table does not state {option}"
    wrong = {o: (v, _actual(o, args, cfg, crit)) for o, v in stated.items() if not _same(v, _actual(o, args, cfg, crit))}
    assert not wrong, f"docs/cli.md states defaults that `bayesprune run` does not use (stated, actual): {wrong}"


def test_cli_md_intro_claims_no_numbers_the_table_does_not_check():
    """The sentence about `bayesprune` alone points at the table instead of restating it."""
    intro = CLI_MD.read_text().split(TABLE_START, 1)[0]
    sentence = re.search(r"`bayesprune` alone runs[^.]*\.", intro)
    assert sentence, "docs/cli.md no longer says what `bayesprune` alone runs"
    assert not re.search(r"\d", sentence.group(0)), f"stale numbers in {sentence.group(0)!r}"


# --------------------------------------------------------------------------- --help
_HELP_DEFAULT = [re.compile(r"default for bmrs_n: ([-0-9.e]+)"), re.compile(r"\(default:? ([^)]+)\)"),
                 re.compile(r"^(\S+) \(default\)")]


def _help_defaults() -> dict[str, str]:
    """{option: stated default} from the help strings of `bayesprune run`."""
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    out = {}
    for action in sub.choices["run"]._actions:
        if not action.option_strings or not action.help or action.dest == "help":
            continue
        for pattern in _HELP_DEFAULT:
            m = pattern.search(" ".join(action.help.split()))
            if m:
                out[action.option_strings[0]] = m.group(1)
                break
    return out


def _help_value(option: str, text: str, args, cfg):
    """The stated default as the value to compare: the first item of a list ("digits, offline"),
    another option's value ("--lr"), or the data folder the data module falls back to."""
    if option == "--data-dir":
        return text
    first = text.split(",")[0].strip()
    if first.startswith("--"):
        return str(getattr(cfg, first[2:].replace("-", "_")))
    return first


def test_help_defaults_are_what_bayesprune_run_resolves(resolved, monkeypatch, tmp_path):
    args, cfg, crit = resolved
    stated = _help_defaults()
    for option in ("--dataset", "--model", "--method", "--sharing", "--prior-odds"):
        assert option in stated, f"`bayesprune run --help` states no default for {option}"
    wrong = {}
    for option, text in stated.items():
        value = _help_value(option, text, args, cfg)
        if option == "--data-dir":
            # no --data-dir: the data module's folder, which the help describes
            assert cfg.data_dir is None
            for var in ("BAYESPRUNE_DATA_DIR", "BAYESPRUNE_CACHE_DIR", "XDG_CACHE_HOME"):
                monkeypatch.delenv(var, raising=False)
            monkeypatch.setenv("HOME", str(tmp_path))
            home = Path("~/.cache/bayesprune/data").expanduser()
            if "~/.cache/bayesprune/data" not in text or default_data_dir() != home:
                wrong[option] = (text, str(default_data_dir()))
            monkeypatch.setenv("BAYESPRUNE_DATA_DIR", str(tmp_path / "d"))
            if "$BAYESPRUNE_DATA_DIR" not in text or default_data_dir() != tmp_path / "d":
                wrong[option] = (text, str(default_data_dir()))
            continue
        actual = _actual(option, args, cfg, crit)
        if not _same(value, actual):
            wrong[option] = (text, actual)
    assert not wrong, f"`bayesprune run --help` states defaults that it does not use (stated, actual): {wrong}"


def test_same_rejects_what_differs():
    """The comparison the tests above rely on can fail."""
    assert _same("2.507", math.sqrt(2 * math.pi)) and not _same("2.51", 1.0)
    assert _same("-0.919", -0.5 * math.log(2 * math.pi)) and not _same("-0.919", 0.0)
    assert _same("10", 10) and not _same("15", 10)
    assert _same("mlp", "mlp") and not _same("lenet5", "mlp")
    assert _same("0", [0]) and not _same("0 1", [0])


# --------------------------------------------------------------------------- docs/maths.md citations
def _maths_sections() -> dict[str, str]:
    """{"N": text of section N} of docs/maths.md (headings "## N. Title")."""
    parts = re.split(r"^## (\d+)\. (.*)$", MATHS_MD.read_text(), flags=re.M)
    return {parts[i]: parts[i + 1] + "\n" + parts[i + 2] for i in range(1, len(parts) - 2, 3)}


def _citations():
    pattern = re.compile(r"docs/maths\.md,? sections? (\d+)(?:-(\d+))?(?:, \"([^\"]+)\")?")
    for path in sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py")):
        for m in pattern.finditer(path.read_text()):
            yield path.relative_to(ROOT), m


def test_every_cited_maths_section_exists():
    sections = _maths_sections()
    assert [int(k) for k in sections] == list(range(1, len(sections) + 1)), f"docs/maths.md sections: {list(sections)}"
    cited = list(_citations())
    assert len(cited) >= 10, "the docstrings cite docs/maths.md sections (fewer found than expected)"
    bad = []
    for path, m in cited:
        first, last, title = m.group(1), m.group(2) or m.group(1), m.group(3)
        for n in range(int(first), int(last) + 1):
            if str(n) not in sections:
                bad.append(f"{path}: {m.group(0)!r} (no section {n})")
        if title and not re.search(rf"^### [\d.]+ {re.escape(title)}\b", sections.get(first, ""), flags=re.M):
            bad.append(f"{path}: {m.group(0)!r} (no subsection {title!r} in section {first})")
    assert not bad, "citations of docs/maths.md that name no section:\n" + "\n".join(bad)


def test_maths_sections_hold_what_the_code_cites_them_for():
    s = _maths_sections()
    assert s["1"].startswith("Multiplicative noise") and s["2"].startswith("Bayesian model reduction")
    assert s["3"].startswith("Baseline criteria") and s["4"].startswith("Protocols")
    assert s["5"].startswith("Bayes-factor pruning")
    assert "E[θ]" in s["1"] and "KL(q‖p)" in s["1"] and "Sampling" in s["1"]
    assert "dF_N" in s["2"] and "0.919" in s["2"] and "Prior odds" in s["2"] and "dF_U" in s["2"]
    assert "snr" in s["3"] and "etheta" in s["3"] and "l2" in s["3"]
    assert "Post-training pruning" in s["4"] and "| MLP | MNIST | 7 | 100 | 128 | 8.5e-4 |" in s["4"]
    assert "Bayes factor" in s["5"]


def test_nothing_points_at_the_old_math_page():
    old = "MATH" + ".md"
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "src").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    hits = [str(f.relative_to(ROOT)) for f in files if old in f.read_text()]
    assert not hits, f"files still pointing at {old}: {hits}"


# --------------------------------------------------------------------------- machine paths
MACHINE_PATH = re.compile(r"(?<![\w.])/(work|tmp|home|root|Users)/")


def test_committed_results_and_docs_hold_no_machine_paths():
    """results/ and docs/ name folders relative to the repository (scripts/relative_result_paths.py
    rewrote the old runs' absolute out_dir / data_dir)."""
    files = [p for p in (ROOT / "results").rglob("*") if p.suffix in (".json", ".jsonl", ".md")]
    files += list((ROOT / "docs").glob("*.md"))
    assert len(files) > 100, "results/ lost its summaries"
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in [MACHINE_PATH.search(p.read_text())] if m]
    assert not hits, "absolute paths of the machine in committed files:\n" + "\n".join(hits[:20])


def test_machine_path_pattern_finds_what_it_should():
    assert MACHINE_PATH.search('"out_dir": "/work/runs/paper"') and MACHINE_PATH.search("(/tmp/gpu2/bf-table1)")
    assert not MACHINE_PATH.search('"out_dir": "results/paper/bmrs-table1"') and not MACHINE_PATH.search("../shared/datasets")


def test_generated_pages_are_what_the_committed_results_give():
    """README.md's results block, docs/RESULTS.md and its notes are generated from results/
    (`python docs/make_results.py`); a typed edit or a summary added without regenerating fails."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, str(ROOT / "docs" / "make_results.py"), "--check"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
