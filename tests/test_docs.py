"""README.md and docs/*.md do not go stale silently: every relative link resolves (the file, and
the heading an #anchor names), and every `python inpaint.py ...` or `python benchmarks/X.py ...`
command they show (in code blocks or inline code, torchrun's included) parses with that script's
own argument parser, its values in range. A usage synopsis (`[--flag VALUE]`) is checked flag by
flag: each flag exists, and each literal value it shows parses. `...` as the only arguments stands
for arguments shown elsewhere and is not checked; placeholders such as IMAGE are plain strings."""
import contextlib
import io
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import agreement  # noqa: E402
import app  # noqa: E402
import app_previews  # noqa: E402
import bench  # noqa: E402
import ddnm_speed  # noqa: E402
import inpaint  # noqa: E402
import table1  # noqa: E402
import throughput  # noqa: E402
import versus  # noqa: E402
import where  # noqa: E402
from ldm_min import LdmMinError  # noqa: E402
from weights import pick_device  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Each script's parser, and what its main() then checks before any work.
SCRIPTS = {"inpaint.py": (inpaint.parse_args, inpaint.options_of),
           "app.py": (app.parse_args, None),
           "benchmarks/app_previews.py": (app_previews.parse_args, None),
           "benchmarks/bench.py": (bench.parse_args, None),
           "benchmarks/ddnm_speed.py": (ddnm_speed.parse_args, None),
           "benchmarks/versus.py": (versus.parse_args, None),
           "benchmarks/where.py": (where.parse_args, None),
           "benchmarks/agreement.py": (agreement.parse_args, None),
           "benchmarks/table1.py": (table1.parse_args, None),
           "benchmarks/throughput.py": (throughput.parse_args, None)}
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"(?:^|\s)(?:python|torchrun)(?:\s+-\S+)*\s+(inpaint\.py|app\.py|benchmarks/\w+\.py)(?=\s|$)(.*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")


def code_lines(text):
    """Each line of each code block, a command's continuation lines (after a trailing backslash,
    or indented under it) joined to it; then each inline code span outside the blocks."""
    for block in FENCE.findall(text):
        lines = []
        for line in block.splitlines()[1:-1]:
            if lines and (lines[-1].endswith("\\") or (line[:1].isspace() and COMMAND.search(lines[-1]))):
                lines[-1] = lines[-1].removesuffix("\\") + " " + line.strip()
            else:
                lines.append(line)
        yield from lines
    yield from INLINE.findall(FENCE.sub("", text))


def commands(page):
    """(script, the text after it) for each command the page shows."""
    found = []
    for line in code_lines(page.read_text(encoding="utf-8")):
        match = COMMAND.search(line)
        if match and shlex.split(match.group(2), comments=True) != ["..."]:
            found.append((match.group(1), match.group(2).strip()))
    return found


def headings(page):
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    titles = re.findall(r"^#+\s+(.+?)\s*$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-") for title in titles}


def broken_links(page):
    """The relative links of a page whose file or heading is not there."""
    broken = []
    for target in LINK.findall(INLINE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not this project's to keep
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and (file.suffix != ".md" or anchor not in headings(file))):
            broken.append(target)
    return broken


def parse(script, argv):
    """Parse argv with the script's parser, and check its values as the script then checks them
    before any work; a refusal is an AssertionError with the script's own message."""
    parse_args, check = SCRIPTS[script]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parse_args(argv)
    except SystemExit:
        raise AssertionError(f"{script} {shlex.join(argv)}: {stderr.getvalue().strip()}") from None
    try:
        if check:
            check(args)
        # --device and --dtype as load_models takes them, with a GPU there, since commands for one are shown.
        with mock.patch.object(torch.cuda, "is_available", return_value=True):
            for dtype in args.dtype.split(",") if hasattr(args, "device") else []:
                pick_device(args.device, dtype)
    except LdmMinError as e:
        raise AssertionError(f"{script} {shlex.join(argv)}: {e}") from None


def check_command(script, text):
    """A concrete command parses whole. A synopsis parses without its [optional parts]; then each
    flag it shows parses beside that: with each literal value it shows (`--region auto|full`: both),
    or with its placeholder (`--feather PX`), where only a wrong type may be refused."""
    if "[" not in text:
        parse(script, shlex.split(text, comments=True))
        return
    required = text
    while re.search(r"\[[^\[\]]*\]", required):
        required = re.sub(r"\[[^\[\]]*\]", "", required)
    base = shlex.split(required, comments=True)
    parse(script, base)
    for flag, value in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)(?:[ =]([^\s\[\]]+))?", text):
        values = value.split("|") if value else []
        if not values:
            parse(script, base + [flag])  # a switch
        for literal in (v for v in values if not PLACEHOLDER.fullmatch(v)):
            parse(script, base + [flag, literal])
        for placeholder in filter(PLACEHOLDER.fullmatch, values):
            try:
                parse(script, base + [flag, placeholder])
            except AssertionError as e:
                if "invalid" not in str(e):  # argparse's "invalid int value": the flag exists, takes a number
                    raise


def shown_commands():
    return [pytest.param(script, text, id=f"{page.relative_to(ROOT)}: {script} {text}"[:120])
            for page in PAGES for script, text in commands(page)]


def test_the_readme_stays_a_front_page_of_at_most_260_lines():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 260  # depth goes to docs/


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("script, text", shown_commands())
def test_every_command_shown_parses_with_its_script(script, text):
    check_command(script, text)


def test_every_script_with_a_parser_is_shown_somewhere():
    """So that a change to how commands are found cannot make the test above check nothing."""
    assert {script for page in PAGES for script, _ in commands(page)} == set(SCRIPTS)


@pytest.mark.parametrize("script, text", [
    ("inpaint.py", "IMAGE MASK --made-up-flag"),
    ("inpaint.py", "IMAGE MASK --steps 0"),
    ("inpaint.py", "IMAGE MASK --latent-mask fuzzy"),
    ("inpaint.py", "IMAGE MASK --dtype float64"),
    ("inpaint.py", "IMAGE MASK [--steps 30] [--made-up-flag PX]"),
    ("inpaint.py", "IMAGE MASK [--region auto|fuzzy]"),
    ("benchmarks/versus.py", "--dtype float32,float64"),
    ("benchmarks/where.py", "--dtype float16"),
    ("benchmarks/bench.py", "--device cpu --dtype float16"),
    ("benchmarks/table1.py", "--out OUT"),
    ("benchmarks/table1.py", "--data D --out O --masks 600"),
])
def test_a_command_the_script_would_refuse_is_caught(script, text):
    with pytest.raises(AssertionError):
        check_command(script, text)


def test_a_missing_file_or_heading_is_caught(tmp_path):
    (tmp_path / "there.md").write_text("# A heading, with punctuation\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading-with-punctuation) [gone](missing.md) [no heading](there.md#nowhere) "
                    "[web](https://example.org/x) `[in code](missing.md)`\n")
    assert broken_links(page) == ["missing.md", "there.md#nowhere"]


def equation_map_rows():
    """The README's equation map: each table row of its section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Equation map", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]


def test_the_equation_maps_pointers_are_in_the_code():
    """Each file it names exists; each line tag it quotes (`line 3, eq. 3`, `eq. 4`, `BLD, Alg. 1`) is
    a comment in ldm_min/, each `name()` a function there, each `Class.method` that class's method."""
    sources = {path.name: path.read_text(encoding="utf-8") for path in (ROOT / "ldm_min").glob("*.py")}
    code = "\n".join(sources.values())
    spans = [span for row in equation_map_rows() for span in INLINE.findall(row)]
    assert any(span.startswith("line 3") for span in spans)  # the map was found and read
    for span in spans:
        if re.fullmatch(r"ldm_min/\w+\.py", span):
            assert (ROOT / span).exists(), span
        elif re.match(r"(line \d|eq\. \d|BLD, Alg\. \d)", span):
            tagged = f"# {span}" in code
            assert tagged, f"no comment tagged {span!r} in ldm_min/"
        elif match := re.fullmatch(r"(\w+)\(\)", span):
            assert re.search(rf"^\s*def {match[1]}\(", code, re.M), span
        elif match := re.fullmatch(r"([A-Z]\w*)\.(\w+)", span):
            assert any(re.search(rf"^class {match[1]}\b", text, re.M) and re.search(rf"^\s+def {match[2]}\(", text, re.M)
                       for text in sources.values()), span


def test_the_readmes_line_count_of_ldm_min_holds_to_the_hundred():
    """The README says how long ldm_min/ is, counted as `cat ldm_min/*.py | wc -l` counts it."""
    said = re.search(r"about ([\d,]+) lines as\s+`cat ldm_min/\*\.py \| wc -l`", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert said, "the README no longer says how many lines ldm_min/ has, or how they are counted"
    lines = sum(len(path.read_bytes().splitlines()) for path in (ROOT / "ldm_min").glob("*.py"))
    assert abs(int(said[1].replace(",", "")) - lines) <= 50, f"ldm_min/ has {lines} lines now"


def test_every_count_of_the_papers_printed_typos_says_three():
    """Eq. 1's product to T, eq. 2's sigma, eq. 4's A^+ A y: wherever a number of typos is given."""
    files = [*PAGES, *sorted((ROOT / "ldm_min").glob("*.py")), ROOT / "inpaint.py", ROOT / "app.py"]
    counts = [(path.name, match[1]) for path in files
              for match in re.finditer(r"\b(one|two|three|four|five|both|\d+)\s+(?:\w+\s+)?typos\b",
                                       path.read_text(encoding="utf-8"), re.I)]
    assert counts  # the README and docs/conventions.md say it
    assert [(name, word) for name, word in counts if word.lower() != "three"] == []
