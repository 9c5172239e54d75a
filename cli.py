"""`python -m cli ...` from a checkout is the `dinofeat` command. The command itself is dinofeat/cli.py; this file
is not installed (a module named `cli` in site-packages would shadow, or be shadowed by, anyone's own `cli.py`)."""

from dinofeat.cli import app, main  # noqa: F401

if __name__ == "__main__":
    main()
