"""The README's quickstart runs as written in a new shell (the bash block, then the Python
block)."""

import re
import shlex
from pathlib import Path

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


def test_quickstart_runs_in_a_new_shell(tmp_path):
    """The bash block in a fresh ``bash`` whose PATH has no venv (its first line activates the
    set-up's), then the Python block with that environment's ``python``."""
    import os
    import subprocess
    import sys

    blocks = _quickstart_blocks()
    assert [kind for kind, _ in blocks] == ["bash", "python"]
    lines = blocks[0][1].strip().splitlines()
    assert lines[0] == ". .venv/bin/activate"
    assert all(shlex.split(line)[0] == "commvq" for line in lines[1:])
    venv = Path(sys.prefix)  # the environment running the tests: what the set-up made
    script = "\n".join([f". {shlex.quote(str(venv / 'bin' / 'activate'))}", *lines[1:]])
    (tmp_path / "quick.py").write_text(blocks[1][1])
    script += "\npython quick.py\n"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(str(venv))
    )
    out = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:2] == ["30", "2048"]
