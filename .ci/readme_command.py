"""Print the shell command README.md holds after a marker: the first line of the next ```bash block.

    python3 .ci/readme_command.py README.md "ci: test command"

CI runs exactly what README tells a newcomer to run; a marker that is missing or not followed by a
bash block is an error (exit 1), so the two cannot drift apart silently.
"""
import sys
from pathlib import Path


def readme_command(text: str, marker: str) -> str:
    lines = text.splitlines()
    tag = f"<!-- {marker} -->"
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == tag)
    except StopIteration:
        raise SystemExit(f"README has no '{tag}' marker") from None
    fence = next((i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("```")), None)
    if fence is None or lines[fence].strip() != "```bash" or fence + 1 >= len(lines):
        raise SystemExit(f"'{tag}' is not followed by a ```bash block")
    command = lines[fence + 1].strip()
    if not command or command.startswith("```"):
        raise SystemExit(f"the ```bash block after '{tag}' is empty")
    return command


if __name__ == "__main__":
    print(readme_command(Path(sys.argv[1]).read_text(encoding="utf-8"), sys.argv[2]))
