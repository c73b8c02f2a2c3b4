"""Customer text made inert inside the prompt's dialog block.

A message may contain anything a phone keyboard or an API client can send. Rendered into
the prompt, no part of it may start a line of its own (a forged `[time] Менеджер:` line)
or close the `<dialog>` block, whatever Unicode it uses for that:

- NFKC first: full-width and small forms fold to ASCII (`＜/dialog＞`, `﹤`, `＜`);
- every Unicode line break (CR, LF, VT, FF, FS/GS/RS, NEL U+0085, U+2028, U+2029) is one
  line break, and continuation lines are indented;
- angle brackets and their look-alikes become `‹` `›`;
- control, format (zero-width, bidi) and other invisible characters are dropped.
Pure; `prompt.neutralise` calls `neutralise`.
"""

from __future__ import annotations

import re
import unicodedata

# What str.splitlines() breaks on, and CRLF as one break.
_LINE_BREAK = re.compile("\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
# C0/C1 controls (line breaks already folded to \n), bidi and zero-width format characters,
# the BOM, soft hyphen, and the Unicode tag block.
_INVISIBLE = re.compile(
    "[\x00-\x09\x0e-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\ufeff\ufff9-\ufffb\U000e0000-\U000e007f]"
)
# `<` / `>` and what a reader (or a model) takes for them after NFKC.
_OPENERS = "<\u2039\u2329\u3008\u27e8\u276e\u276c\u02c2\u1438\u2264\u226a\u00ab\u300a"
_CLOSERS = ">\u203a\u232a\u3009\u27e9\u276f\u276d\u02c3\u1433\u2265\u226b\u00bb\u300b"
_BRACKETS = str.maketrans(dict.fromkeys(_OPENERS, "‹") | dict.fromkeys(_CLOSERS, "›"))


def neutralise(text: str, continuation: str) -> str:
    """`text` on one logical line: later lines start with `continuation`."""
    text = unicodedata.normalize("NFKC", text)
    text = _LINE_BREAK.sub("\n", text)
    text = _INVISIBLE.sub("", text)
    text = text.translate(_BRACKETS)
    return text.strip().replace("\n", "\n" + continuation)
