"""Write the shell completion scripts for bash, zsh and fish from the Typer app.

Run `make completions` after changing commands; tests/test_docs.py fails when the files drift.
The scripts call `mserve` itself to complete, so they stay right as commands change.
"""

from __future__ import annotations

from pathlib import Path

from typer.completion import get_completion_script

HERE = Path(__file__).parent
FILES = {"bash": "mserve.bash", "zsh": "_mserve", "fish": "mserve.fish"}


def scripts() -> dict[str, str]:
    return {shell: get_completion_script(prog_name="mserve", complete_var="_MSERVE_COMPLETE",
                                         shell=shell) for shell in FILES}


def main() -> None:
    for shell, text in scripts().items():
        (HERE / FILES[shell]).write_text(text.rstrip("\n") + "\n")
        print(f"wrote completions/{FILES[shell]}")


if __name__ == "__main__":
    main()
