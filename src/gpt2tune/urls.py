"""Credentials in URLs: found once, here, so that none is ever printed or written down."""

from __future__ import annotations

import re

# The "user:password@" of a URL (also an empty "@"), just after its "://".
USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def redact(text: str) -> str:
    """`text` with the ``user:password@`` of every URL in it replaced by ``***@``."""
    return USERINFO.sub("***@", text)
