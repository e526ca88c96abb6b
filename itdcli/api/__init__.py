"""One library function behind each command, returning typed pydantic results."""
