"""The `dinofeat` command (the only layer that imports typer): the commands (app.py), the options several commands
share, declared once (options.py), and everything the commands print (render.py)."""

from dinofeat.cli.app import app, main

__all__ = ["app", "main"]
