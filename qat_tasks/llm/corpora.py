"""The texts the 4-bit candidates are calibrated and judged on.

- Generic text: the real Wikipedia articles and news stories that ship inside gensim's test data (no network),
  split once by article into calibration and held-out documents, so generic calibration never sees the text
  that generic perplexity is measured on.
- MangaAssist text: logged conversations rendered with one fixed format (`conversation_texts`).
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SYSTEM_PROMPT = ("You are MangaAssist, the customer assistant of an online manga shop. Answer briefly and politely; "
                 "hand the customer to a person when they ask for one.")

# ---------------------------------------------------------------------------------------------------------------
# Generic text: gensim's bundled real English prose
# ---------------------------------------------------------------------------------------------------------------
# The real English prose among gensim's test files. Left out on purpose: head500.noblanks.cor (stemmed),
# alldata-id-10.txt / pang_lee_polarity.cor (lower-cased, tokenized reviews), mini_newsgroup (a pickled sklearn
# object: Usenet headers and e-mail addresses), varembed_lee_subcorpus.cor (a subset of lee.cor),
# enwiki-table-markup.xml.bz2 (tables), bgwiki-*.bz2 (Bulgarian), crime-and-punishment.txt (Russian).
NEWS_FILES = (("lee_background.cor", "utf-8"), ("lee.cor", "latin-1"))  # Australian news stories, one per line
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"  # 206 pages, 106 articles
WIKI_PLAIN = ("para2para_text1.txt", "para2para_text2.txt")  # Wikipedia's New York and Berlin, plain text
# Sections after which a Wikipedia article is citations and links, not prose.
_WIKI_TAIL = re.compile(r"^=+\s*(references|notes|see also|external links|bibliography|further reading|sources|"
                        r"citations|footnotes|notes and references)\s*=+\s*$", re.I | re.M)
PASSAGE_CHARS = 2000  # long articles are served in passages of about this many characters (paragraph boundaries)


@dataclass(frozen=True)
class GenericDocument:
    source: str  # "news" or "wikipedia"
    title: str
    text: str

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.source}\0{self.title}\0{self.text}".encode()).hexdigest()


def _clean_wiki(markup: str) -> str:
    """Article prose from wiki markup: gensim's filter_wiki, then paragraphs only (no headings, lists, tables,
    image captions), nothing after References / See also, bold/italic quotes and emptied brackets removed."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    tail = _WIKI_TAIL.search(text)
    text = text[:tail.start()] if tail else text
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if (len(line) < 80 or line[0] in "=*#:;|!{}" or not re.search(r"[.!?][\"')]?$", line)
                or line.count(" ") < 10):
            continue
        line = re.sub(r"'{2,}", "", line)
        line = re.sub(r"\(\s*[;,]?(\s*[;,])*\s*\)", "", line)  # "(; , )" left where templates were
        line = re.sub(r"\[\d+\]", "", line)
        paragraphs.append(re.sub(r"\s{2,}", " ", line).replace(" ,", ",").replace(" .", "."))
    return "\n".join(paragraphs)


@functools.lru_cache(maxsize=1)
def generic_documents() -> tuple[GenericDocument, ...]:
    """Every real-prose document in gensim's test data, deduplicated, in file order."""
    from gensim.corpora.wikicorpus import extract_pages
    from gensim.test.utils import datapath

    docs: list[GenericDocument] = []
    for name, encoding in NEWS_FILES:
        for i, line in enumerate(Path(datapath(name)).read_text(encoding=encoding).splitlines()):
            line = re.sub(r"\s+", " ", line).strip()
            if len(line) >= 200:
                docs.append(GenericDocument("news", f"{name}:{i}", line))
    with bz2.open(datapath(WIKI_DUMP)) as fh:
        for title, markup, _ in extract_pages(fh):
            if markup.lstrip()[:9].upper() == "#REDIRECT":
                continue
            text = _clean_wiki(markup)
            if len(text) >= 500:
                docs.append(GenericDocument("wikipedia", title, text))
    for name in WIKI_PLAIN:
        raw = Path(datapath(name)).read_text(encoding="utf-8")
        text = "\n".join(re.sub(r"\[\d+\]", "", p).strip() for p in raw.splitlines() if len(p.strip()) >= 80)
        docs.append(GenericDocument("wikipedia", name, text))
    seen: set[str] = set()
    unique = []
    for d in docs:
        if d.text not in seen:
            seen.add(d.text)
            unique.append(d)
    return tuple(unique)


def _passages(text: str, chars: int) -> list[str]:
    """Consecutive paragraphs grouped up to about `chars` characters (a paragraph is never cut)."""
    out, cur = [], ""
    for para in text.split("\n"):
        if cur and len(cur) + len(para) + 1 > chars:
            out.append(cur)
            cur = para
        else:
            cur = f"{cur}\n{para}" if cur else para
    return [*out, cur] if cur else out


def generic_texts(max_chars: int | None = None, heldout_fraction: float = 0.5,
                  passage_chars: int = PASSAGE_CHARS) -> dict[str, list[str]]:
    """{"calibration": [...], "heldout": [...]}: gensim's real news and Wikipedia text, split by ARTICLE with a
    fixed hash (the same split on every machine and run; no article, so no passage, in both).

    Long articles come as passages of about `passage_chars` characters, ordered round-robin (every article's
    first passage, then every second passage, ...), so a budget of `max_chars` per split still spans many
    articles and both sources instead of one long article. The last text is cut to fit `max_chars` exactly."""
    splits: dict[str, list[tuple[int, str, str]]] = {"calibration": [], "heldout": []}
    for doc in generic_documents():
        u = int(doc.key[:16], 16) / 2**64
        split = "heldout" if u < heldout_fraction else "calibration"
        for rank, passage in enumerate(_passages(doc.text, passage_chars)):
            splits[split].append((rank, doc.key, passage))
    out: dict[str, list[str]] = {}
    for split, items in splits.items():
        texts, used = [], 0
        for _, _, passage in sorted(items):
            if max_chars is not None and used + len(passage) > max_chars:
                if max_chars - used > 0:
                    texts.append(passage[:max_chars - used])
                break
            texts.append(passage)
            used += len(passage)
        out[split] = texts
    return out


# ---------------------------------------------------------------------------------------------------------------
# MangaAssist conversations
# ---------------------------------------------------------------------------------------------------------------
def conversation_texts(conversations: list[dict], tokenizer=None, style: str = "transcript") -> list[str]:
    """One string per conversation, in a fixed format.

    Logs hold only the customer's turns and the intent each was routed to, never the assistant's replies, so
    the default renders a plain transcript:

        Customer: where is my order MA-2026-1234
        Assistant: [routes to order_status]

    It is the same string for every model family (a Llama 3 and a SmolLM2 chat template differ), and it puts
    the weight of perplexity on customer language (slang, typos, titles, order numbers) rather than on chat
    template tokens every model predicts perfectly. style="chat" renders the same turns with the tokenizer's chat
    template and the MangaAssist system prompt instead (comparable only between candidates of one tokenizer,
    which is all the track compares)."""
    if style not in ("transcript", "chat"):
        raise ValueError(f"style {style!r}: expected 'transcript' or 'chat'")
    out = []
    for conv in conversations:
        turns = sorted(conv["turns"], key=lambda t: t["turn"])
        if style == "chat":
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError("style='chat' needs a tokenizer with a chat template")
            messages = [{"role": "system", "content": SYSTEM_PROMPT}]
            for t in turns:
                messages += [{"role": "user", "content": t["text"]},
                             {"role": "assistant", "content": f"[routes to {t.get('label') or 'unknown'}]"}]
            out.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            lines = []
            for t in turns:
                lines.append(f"Customer: {' '.join(t['text'].split())}")
                if t.get("label"):
                    lines.append(f"Assistant: [routes to {t['label']}]")
            out.append("\n".join(lines))
    return out


