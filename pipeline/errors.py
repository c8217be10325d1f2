"""The one error type users see: a single line naming the file and tensor at fault."""

from __future__ import annotations


class InputError(Exception):
    """Bad input (checkpoint, option or per-rank folder). The CLI prints it as one line and exits 2."""

    def __init__(self, message: str, *, file: object | None = None, tensor: str | None = None):
        where = ", ".join(part for part in (f"{file}" if file else "", f"tensor '{tensor}'" if tensor else "") if part)
        super().__init__(f"{where}: {message}" if where else message)
