"""The README's quickstart runs as written (shell lines through the CLI, then the Python block)."""

import re
import shlex
from pathlib import Path

from commvq import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart_blocks():
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


def test_readme_has_two_setup_commands():
    text = README.read_text()
    setup = text.split("## Set up", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [ln for ln in setup.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 2
    assert (README.parent / ".ci" / "run").read_text().count("scripts/test.sh") == 1
    assert "scripts/test.sh" in commands[1]


def test_quickstart_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = _quickstart_blocks()
    assert [kind for kind, _ in blocks] == ["bash", "python"]
    for line in blocks[0][1].strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "commvq"
        assert cli.main(argv[1:]) == 0, line
    exec(compile(blocks[1][1], "README quickstart", "exec"), {})
    out = capsys.readouterr().out.split()
    assert out[:2] == ["30", "2048"]
