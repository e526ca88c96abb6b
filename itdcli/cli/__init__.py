"""Thin typer commands: parse, build the pydantic options, call one library function, render."""
