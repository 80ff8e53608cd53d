"""The README and docs/ stay true to the repository: every relative link and image resolves (an
``#anchor`` to a heading of its target); every ``distshard`` command line shown is one the command
line's parser accepts; every repository script a command runs exists, with the options it is
given, and so does every repository path named in code; the README stays a front page that links
every docs page and shows the test command ``.ci/run`` runs. Pure text checks: no process is
started, except where distshard/cli.py offers no function that builds its parser (then
``--help`` is read)."""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300
SHELLS = {"bash", "sh", "shell", "console", "zsh"}
WRAPPERS = {"sudo", "time", "exec", "nohup", "env"}


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# ---- reading markdown -----------------------------------------------------------------------

@dataclass
class Block:
    """A fenced code block: its info string's first word, its lines, and where it starts."""
    lang: str
    lines: list[str]
    line: int


@dataclass
class Doc:
    path: Path
    blocks: list[Block] = field(default_factory=list)
    prose: list[tuple[int, str]] = field(default_factory=list)  # (line number, text) outside fences
    text: str = ""  # the page with code blocks and HTML comments blanked, lines kept in place


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")


def read_doc(path: Path) -> Doc:
    doc = Doc(path)
    fence = None
    text = re.sub(r"<!--.*?-->", lambda m: "\n" * m.group().count("\n"),
                  path.read_text(encoding="utf-8"), flags=re.DOTALL)
    kept = []
    for number, line in enumerate(text.split("\n"), 1):
        m = _FENCE.match(line)
        kept.append(line if fence is None and not m else "")
        if fence is None and m:
            fence = m.group(1)
            doc.blocks.append(Block(m.group(2).lower(), [], number))
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) \
                and not line.strip().strip(fence[0]):
            fence = None
        elif fence is not None:
            doc.blocks[-1].lines.append(line)
        else:
            doc.prose.append((number, line))
    assert fence is None, f"{path}: a code block opened at line {doc.blocks[-1].line} is not closed"
    doc.text = "\n".join(kept)
    return doc


# a code span may wrap onto the next line of its paragraph, not past a blank line
_CODE_SPAN = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.DOTALL)


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def code_spans(doc: Doc) -> list[tuple[int, str]]:
    """Every inline code span (it may wrap onto the next line), as one line of text."""
    return [(_line_of(doc.text, m.start()), " ".join(m.group(2).split()))
            for m in _CODE_SPAN.finditer(doc.text)]


def _without_code(text: str) -> str:
    return _CODE_SPAN.sub(lambda m: "code" + "\n" * m.group().count("\n"), text)


_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_REF = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)


def links(doc: Doc) -> list[tuple[int, str]]:
    """Every link and image target outside code: Markdown ``[..](..)``, ``![..](..)``, and HTML
    ``<a href>`` / ``<img src>``."""
    text = _without_code(doc.text)
    return sorted((_line_of(text, m.start()), m.group(1))
                  for pattern in (_LINK, _HTML_REF) for m in pattern.finditer(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, punctuation dropped (letters,
    digits, ``_``, ``-`` and spaces kept), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image: its text
    text = re.sub(r"<[^>]+>", "", text)                         # HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(doc: Doc) -> set[str]:
    """The anchors of a page's headings (a repeated one gets -1, -2, ... as on GitHub), and any
    explicit ``<a id|name="...">``."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in doc.prose:
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
        result |= set(re.findall(r"<a\s[^>]*\b(?:id|name)=\"([^\"]+)\"", line))
    return result


# ---- (a) links and images ---------------------------------------------------------------------

def broken_links(files: list[Path], root: Path) -> list[str]:
    problems = []
    parsed: dict[Path, Doc] = {}

    def doc_of(path: Path) -> Doc:
        if path not in parsed:
            parsed[path] = read_doc(path)
        return parsed[path]

    for path in files:
        doc = doc_of(path)
        for number, target in links(doc):
            where = f"{path.relative_to(root)}:{number}: {target}"
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("//"):
                continue  # http:, https:, mailto: ... (not checked: no network in tests)
            file_part, _, anchor = target.partition("#")
            dest = Path(os.path.normpath(path.parent / unquote(file_part))) if file_part else path
            if root not in (dest, *dest.parents):
                problems.append(f"{where}: leads outside the repository")
                continue
            if not dest.exists():
                problems.append(f"{where}: no such file or folder")
                continue
            if not anchor:
                continue
            if dest.suffix == ".md":
                if unquote(anchor) not in anchors(doc_of(dest)):
                    problems.append(f"{where}: no heading with anchor #{anchor} in "
                                    f"{dest.relative_to(root)}")
            elif not re.fullmatch(r"L\d+(-L\d+)?", anchor):
                problems.append(f"{where}: an anchor into a file that is not Markdown")
    return problems


# ---- commands shown ---------------------------------------------------------------------------

def _command_lines(block: Block) -> list[tuple[int, str]]:
    """The command lines a block shows, with their line numbers: after a ``$ `` prompt where it
    has one (the rest is output); every line of a shell block; a comment line of a Python block
    that shows how it is run (``# torchrun ... script.py``)."""
    lines = list(enumerate(block.lines, block.line + 1))
    if any(line.startswith("$ ") for _, line in lines):
        return [(n, line[2:]) for n, line in lines if line.startswith("$ ")]
    if block.lang in SHELLS:
        joined, start, out = "", None, []
        for n, line in lines:
            start = start or n
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            out.append((start, joined + line))
            joined, start = "", None
        return [(n, line) for n, line in out
                if line.strip() and not line.lstrip().startswith("#")]
    if block.lang == "python":
        run = re.compile(r"#\s+(([A-Z_]+=\S+\s+)*(torchrun|python3?|distshard)\s.*)")
        return [(n, m.group(1)) for n, line in lines if (m := run.fullmatch(line.strip()))]
    return []


def simple_commands(line: str) -> list[list[str]]:
    """A shell line cut into simple commands (at ``;``, ``&``, ``|``, ``&&``, ``||``), each
    without leading ``NAME=value`` assignments and wrappers such as ``sudo``; the string of
    ``script -c``, ``bash -c`` or ``sh -c`` is read as commands too."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:
        return []
    commands, current = [], []
    for token in tokens + [";"]:
        if token and set(token) <= set(";&|()<>"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    result = []
    for command in commands:
        while command and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0])
                           or command[0] in WRAPPERS):
            command = command[1:]
        if not command:
            continue
        result.append(command)
        if Path(command[0]).name in ("script", "bash", "sh") and "-c" in command[:-1]:
            result += simple_commands(command[command.index("-c") + 1])
    return result


def shown_commands(doc: Doc) -> list[tuple[int, list[str]]]:
    """Every simple command shown: in fenced blocks, and in code spans that start with
    ``python`` or ``torchrun`` (a ``distshard`` code span is a synopsis, with placeholders: see
    synopsis_problems)."""
    found = []
    for block in doc.blocks:
        for number, line in _command_lines(block):
            found += [(number, c) for c in simple_commands(line)]
    for number, span in code_spans(doc):
        if re.match(r"^(sudo\s+)?([A-Z_]+=\S+\s+)*(python3?|torchrun)\s(?!-m\s+distshard\b)", span):
            found += [(number, c) for c in simple_commands(span)]
    return found


def _is_python(program: str) -> bool:
    return re.fullmatch(r"python(3(\.\d+)?)?", Path(program).name) is not None


def distshard_argv(command: list[str]) -> list[str] | None:
    """The arguments of a ``distshard ...`` or ``python -m distshard ...`` command, else None."""
    if command[0] == "distshard":
        return command[1:]
    if _is_python(command[0]) and command[1:3] == ["-m", "distshard"]:
        return command[3:]
    return None


def script_of(command: list[str], root: Path) -> tuple[str, list[str]] | None:
    """The ``.py`` file a ``python`` / ``torchrun`` command runs and the arguments it passes,
    where that file is a repository path (its first folder is one of the repository's); None for
    a user's script shown as an example (``train.py``) and for ``python -m module``."""
    program = Path(command[0]).name
    if not (_is_python(command[0]) or program == "torchrun"):
        return None
    args = command[1:]
    if _is_python(command[0]) and args[:2] == ["-m", "torch.distributed.run"]:
        args = args[2:]
    elif _is_python(command[0]) and args[:1] == ["-m"]:
        return None
    for i, arg in enumerate(args):
        if arg.endswith(".py") and not arg.startswith("-"):
            first = arg.split("/")[0]
            if "/" in arg and first and (root / first).is_dir() and not first.startswith("."):
                return arg, args[i + 1:]
            return None
    return None


# ---- (b) the distshard command line -----------------------------------------------------------

class Cli:
    """What ``distshard``'s parser accepts: each subcommand's option strings, and, where
    distshard/cli.py has a function returning its parser, a full parse of an argument list."""

    def __init__(self) -> None:
        self.parser: argparse.ArgumentParser | None = None
        self.options: dict[str, set[str]] = {}
        from distshard import cli

        build = getattr(cli, "build_parser", None) or getattr(cli, "_parser", None)
        parser = build() if callable(build) else None
        if isinstance(parser, argparse.ArgumentParser):
            self.parser = parser
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, sub in action.choices.items():
                        self.options[name] = {s for a in sub._actions for s in a.option_strings}
        else:  # no parser to import: read --help, as a person would
            usage = self._help()
            names = re.search(r"\{([\w,-]+)\}", usage)
            assert names, f"no subcommands in distshard --help:\n{usage}"
            for name in names.group(1).split(","):
                self.options[name] = set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*",
                                                    self._help(name)))

    @staticmethod
    def _help(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "distshard", *args, "--help"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def problems(self, argv: list[str], *, exact: bool = True) -> list[str]:
        """What is wrong with ``distshard argv``: an unknown subcommand, an option the
        subcommand does not define (exact names: no abbreviations), and with ``exact`` a full
        parse by the real parser (required arguments, values)."""
        if not argv or argv[0] not in self.options:
            return [f"{argv[:1]} is not a subcommand of distshard ({', '.join(self.options)})"]
        found = []
        for arg in argv[1:]:
            name = arg.split("=", 1)[0]
            if name.startswith("-") and name not in self.options[argv[0]]:
                found.append(f"distshard {argv[0]} has no option {name}")
        if exact and not found and self.parser is not None:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    self.parser.parse_args(argv)
                except SystemExit as exited:
                    if exited.code:
                        found.append(err.getvalue().strip().splitlines()[-1])
        return found


@pytest.fixture(scope="module")
def cli() -> Cli:
    return Cli()


def cli_problems(files: list[Path], root: Path, cli: Cli) -> list[str]:
    problems = []
    for path in files:
        doc = read_doc(path)
        for number, command in shown_commands(doc):
            argv = distshard_argv(command)
            if argv is not None:
                problems += [f"{path.relative_to(root)}:{number}: {shlex.join(command)}: {why}"
                             for why in cli.problems(argv)]
    return problems


def synopsis_problems(files: list[Path], root: Path, cli: Cli) -> list[str]:
    """Code spans such as ``distshard plan CKPT --world-size N [--nodes M]``: the subcommand
    exists and each ``--option`` it names is one of that subcommand's."""
    problems = []
    for path in files:
        for number, span in code_spans(read_doc(path)):
            m = re.match(r"^(?:distshard|python -m distshard)\s+([a-z][\w-]*)", span)
            if m:
                argv = [m.group(1), *re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", span)]
                problems += [f"{path.relative_to(root)}:{number}: `{span}`: {why}"
                             for why in cli.problems(argv, exact=False)]
    return problems


# ---- (c) repository scripts -------------------------------------------------------------------

def script_problems(files: list[Path], root: Path) -> list[str]:
    """Every repository script a command shown runs exists, and every ``--option`` passed to it
    is defined in its folder (argparse in the script or a module beside it, e.g. common.py)."""
    problems = []
    for path in files:
        doc = read_doc(path)
        for number, command in shown_commands(doc):
            where = f"{path.relative_to(root)}:{number}: {shlex.join(command)}"
            first = command[0].split("/")[0]
            if "/" in command[0] and first and (root / first).is_dir():  # docker/node.sh 1
                if not (root / command[0]).is_file():
                    problems.append(f"{where}: {command[0]} does not exist")
                continue
            found = script_of(command, root)
            if found is None:
                continue
            script, args = found
            if not (root / script).is_file():
                problems.append(f"{where}: {script} does not exist")
                continue
            defined = "".join(p.read_text(encoding="utf-8")
                              for p in (root / script).parent.glob("*.py"))
            for arg in args:
                name = arg.split("=", 1)[0]
                if name.startswith("--") and f'"{name}"' not in defined \
                        and f"'{name}'" not in defined:
                    problems.append(f"{where}: {script} defines no option {name}")
    return problems


def path_problems(files: list[Path], root: Path) -> list[str]:
    """Code spans that name a repository path (``launch_examples/moe.py``,
    ``benchmarks/results/*.txt``) name one that exists."""
    problems = []
    for path in files:
        for number, span in code_spans(read_doc(path)):
            if not re.fullmatch(r"[\w.-]+(/[\w.*-]+)+/?", span):
                continue
            first = span.split("/")[0]
            if (root / first).is_dir() and not glob.glob(str(root / span)):
                problems.append(f"{path.relative_to(root)}:{number}: `{span}` does not exist")
    return problems


# ---- the checks -------------------------------------------------------------------------------

def test_every_relative_link_and_image_resolves():
    problems = broken_links(doc_files(), ROOT)
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    targets = {(ROOT / t.partition("#")[0]).resolve()
               for _, t in links(read_doc(ROOT / "README.md")) if t.startswith("docs/")}
    missing = [p.name for p in doc_files()[1:] if p.resolve() not in targets]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_every_distshard_command_shown_is_accepted_by_its_parser(cli):
    commands = [c for p in doc_files() for _, c in shown_commands(read_doc(p))
                if distshard_argv(c) is not None]
    assert len(commands) >= 5, commands  # the docs show inspect, plan, verify and reshard
    problems = cli_problems(doc_files(), ROOT, cli) + synopsis_problems(doc_files(), ROOT, cli)
    assert not problems, "\n".join(problems)


def test_every_repository_script_shown_exists_with_its_options():
    scripts = {script_of(c, ROOT)[0] for p in doc_files() for _, c in shown_commands(read_doc(p))
               if script_of(c, ROOT)}
    assert "launch_examples/demo.py" in scripts, scripts
    problems = script_problems(doc_files(), ROOT) + path_problems(doc_files(), ROOT)
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_page():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def test_readme_shows_the_test_command_ci_runs():
    """``.ci/run`` runs the README's test command verbatim: the two must stay the same line."""
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and "pytest" in line]
    assert len(ci) == 1, ci
    shown = [line.strip() for b in read_doc(ROOT / "README.md").blocks for line in b.lines]
    assert ci[0] in shown, f"README.md does not show .ci/run's command:\n{ci[0]}"


# ---- the checks can fail ----------------------------------------------------------------------

def test_slugs_are_githubs():
    assert slug("Saving: `distshard.save`") == "saving-distshardsave"
    assert slug("`distshard.from_pretrained`") == "distshardfrom_pretrained"
    assert slug("Multi-node with Docker (2 nodes x 2 processes, gloo, CPU)") == \
        "multi-node-with-docker-2-nodes-x-2-processes-gloo-cpu"
    assert slug("Limits (today)") == "limits-today"
    assert slug("S1 × S2: [link](x.md)") == "s1--s2-link"


def test_the_checks_find_what_is_wrong(tmp_path, cli):
    (tmp_path / "docs").mkdir()
    (tmp_path / "launch_examples").mkdir()
    (tmp_path / "launch_examples" / "demo.py").write_text(
        'parser.add_argument("--checkpoint")\n')
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Same\n\n## Same\n")
    (tmp_path / "README.md").write_text(
        "# Top\n\n"
        "[ok](docs/a.md#same-1) [ok](#top) [gone](docs/b.md) [bad anchor](docs/a.md#same-2)\n"
        "![image](docs/missing.png) [out](../../etc/passwd) `[not a link](nowhere.md)`\n\n"
        "<!-- [commented out](nowhere.md) -->\n"
        "A [link that\nwraps](docs/wrapped.md), a `python\nlaunch_examples/wrapped.py` span.\n\n"
        "`distshard plan CKPT --world-size N --nodez M`\n\n"
        "```\n$ distshard inspect /tmp/x --model none\n"
        "distshard reshard: failed: this is output, not a command\n"
        "$ distshard plan /tmp/x --nodes 2\n$ distshard frobnicate /tmp/x\n"
        "$ distshard verify /tmp/x --hashh; echo done\n```\n\n"
        "```bash\nOMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 "
        "launch_examples/demo.py --checkpoint x --sizee tiny\n"
        "python launch_examples/nope.py\npython train.py --anything\n"
        "script -q -c \"torchrun --nproc_per_node=2 launch_examples/gone.py\" typescript\n```\n\n"
        "```python\n# torchrun --nproc_per_node=2 launch_examples/also_gone.py\nx = 1\n```\n\n"
        "`launch_examples/demo.py` `launch_examples/missing.py` `launch_examples/*.py`\n")
    files = doc_files(tmp_path)

    assert sorted(p.split(": ", 2)[1] for p in broken_links(files, tmp_path)) == [
        "../../etc/passwd", "docs/a.md#same-2", "docs/b.md", "docs/missing.png",
        "docs/wrapped.md"]
    cli_found = cli_problems(files, tmp_path, cli)
    assert len(cli_found) == 3, cli_found
    assert any("--world-size" in p for p in cli_found)          # plan without its required option
    assert any("frobnicate" in p and "not a subcommand" in p for p in cli_found)
    assert any("no option --hashh" in p for p in cli_found)
    assert [p.rsplit(": ", 1)[1] for p in synopsis_problems(files, tmp_path, cli)] == [
        "distshard plan has no option --nodez"]
    assert sorted(p.rsplit(": ", 1)[1] for p in script_problems(files, tmp_path)) == [
        "launch_examples/also_gone.py does not exist",
        "launch_examples/demo.py defines no option --sizee",
        "launch_examples/gone.py does not exist",
        "launch_examples/nope.py does not exist", "launch_examples/wrapped.py does not exist"]
    assert [p.rsplit(": ", 1)[1] for p in path_problems(files, tmp_path)] == [
        "`launch_examples/missing.py` does not exist"]
