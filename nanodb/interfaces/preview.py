"""Thumbnails drawn inline in a terminal (`--preview`): the kitty graphics protocol or iTerm2's (also
WezTerm's), passed through tmux when running inside it."""

from __future__ import annotations

import base64
import io
import os
import sys

PROTOCOLS = ("kitty", "iterm2")


def preview_protocol() -> str | None:
    """The inline-image protocol of this terminal: "kitty", "iterm2" (also WezTerm), or None.
    NANODB_PREVIEW=kitty|iterm2 forces one (e.g. inside tmux, whose TERM hides the terminal, or into a file)."""
    forced = os.environ.get("NANODB_PREVIEW")
    if forced in PROTOCOLS:
        return forced
    if not sys.stdout.isatty():
        return None
    if os.environ.get("KITTY_WINDOW_ID") or os.environ.get("TERM") == "xterm-kitty":
        return "kitty"
    if os.environ.get("TERM_PROGRAM") in ("iTerm.app", "WezTerm"):
        return "iterm2"
    return None


def preview(path: str, protocol: str, max_pixels: int, size: int = 160, *, tmux: bool | None = None) -> str:
    """A thumbnail of `path` as the escape sequences that draw it inline ("" when it cannot be read).
    `tmux` (default: whether $TMUX is set) wraps each sequence for tmux's passthrough, without which tmux
    drops them."""
    from nanodb.media.opener import ImageRejected, open_image, read_image_file

    try:
        image = open_image(read_image_file(path).data, max_pixels, draft_size=size)
    except (ImageRejected, OSError):
        return ""
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, "PNG")
    data = base64.b64encode(out.getvalue()).decode()
    if protocol == "iterm2":
        sequences = [f"\033]1337;File=inline=1;size={len(out.getvalue())}:{data}\a"]
    else:
        chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
        sequences = [f"\033_G{'a=T,f=100,' if i == 0 else ''}m={int(i < len(chunks) - 1)};{chunk}\033\\"
                     for i, chunk in enumerate(chunks)]
    if tmux is None:
        tmux = bool(os.environ.get("TMUX"))
    return "".join(map(tmux_passthrough, sequences) if tmux else sequences)


def tmux_passthrough(sequence: str) -> str:
    """`sequence` as tmux passes it on to the terminal outside: a DCS `tmux;` string with every ESC
    doubled (tmux >= 3.3 passes it only with `set -g allow-passthrough on`)."""
    return "\033Ptmux;" + sequence.replace("\033", "\033\033") + "\033\\"
