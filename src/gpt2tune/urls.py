"""Credentials in URLs: found once, here, so that none is ever printed or written down."""

from __future__ import annotations

import re

# The "user:password@" of a URL (also an empty "@"), just after its "://".
USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def redact(text: str) -> str:
    """`text` with the ``user:password@`` of every URL in it replaced by ``***@``."""
    return USERINFO.sub("***@", text)


# Where OpenAI publishes the GPT-2 releases (model.base_url's default): <url>/<name>/<file>.
OPENAI_MODELS = "https://openaipublic.blob.core.windows.net/gpt-2/models"
