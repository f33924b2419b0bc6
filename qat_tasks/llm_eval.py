"""Judging the fallback LLM's 4-bit candidates: every candidate sees the SAME token windows and prompts.

- Generic text: the real Wikipedia articles and news stories that ship inside gensim's test data (no network),
  split once by article into calibration and held-out documents, so generic calibration never sees the text
  that generic perplexity is measured on.
- MangaAssist text: logged conversations rendered with one fixed format (`conversation_texts`).
- `TokenWindows` tokenizes once and fingerprints the token ids (sha256); a candidate whose digest differs was
  judged on different inputs, and its numbers do not compare.
- Perplexity is exact: the mean negative log-likelihood over every predicted token, exponentiated.
- Intent routing: the LLM picks one of the ten intents by the log-probability of each label as continuation of a
  fixed few-shot prompt; the shared prompt is encoded once and its KV cache reused for every message.
- Size on disk, peak memory (`RssSampler`) and a perplexity-vs-size chart for MLflow.
"""

from __future__ import annotations

import bz2
import copy
import functools
import hashlib
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qat_tasks.schema import INTENTS

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


# ---------------------------------------------------------------------------------------------------------------
# Token windows and perplexity
# ---------------------------------------------------------------------------------------------------------------
class TokenWindows:
    """Texts tokenized ONCE into fixed, non-overlapping windows of `window` tokens.

    Documents are joined with the tokenizer's EOS token between them (no BOS is added: the standard
    GPTQ/AWQ-paper protocol of cutting one token stream), the ragged tail is dropped and at most `max_tokens`
    tokens are kept (rounded down to whole windows). `digest` is the sha256 of the window shape and the token
    ids: equal digests mean bitwise-identical inputs."""

    def __init__(self, tokenizer, texts: list[str], window: int, max_tokens: int | None = None, name: str = ""):
        import torch

        if window < 2:
            raise ValueError("window must hold at least 2 tokens (one predicted)")
        sep = tokenizer.eos_token_id
        if sep is None:
            raise ValueError("the tokenizer has no EOS token to separate documents")
        budget = None if max_tokens is None else (max_tokens // window) * window
        stream: list[int] = []
        used = 0
        for start in range(0, len(texts), 64):  # in chunks, so a small budget does not tokenize the whole corpus
            for ids in tokenizer(texts[start:start + 64], add_special_tokens=False)["input_ids"]:
                if stream:
                    stream.append(sep)
                stream.extend(ids)
                used += 1
            if budget is not None and len(stream) >= budget:
                break
        n = len(stream) // window
        if budget is not None:
            n = min(n, budget // window)
        if budget is not None and n * window < budget:
            log.warning("%s: only %d tokens of text, fewer than the %d asked for", name or "texts", n * window,
                        budget)
        if n == 0:
            raise ValueError(f"{name or 'texts'}: {len(stream)} tokens do not fill one window of {window}")
        self.name = name
        self.window = window
        self.documents = used
        self.ids = torch.tensor(stream[:n * window], dtype=torch.long).reshape(n, window)
        self.digest = hashlib.sha256(f"{n}x{window}:".encode() + self.ids.numpy().astype("<i8").tobytes()).hexdigest()
        log.info("%s: %d windows of %d tokens (%d tokens from %d documents), digest %s", name or "token windows",
                 n, window, n * window, used, self.digest[:12])

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def tokens(self) -> int:
        return self.ids.numel()

    def describe(self) -> dict:
        return {"name": self.name, "windows": len(self), "window": self.window, "tokens": self.tokens,
                "documents": self.documents, "digest": self.digest}


def _device(model):
    return next(model.parameters()).device


def perplexity(model, windows: TokenWindows, batch_size: int = 4, progress: bool = True) -> dict:
    """Exact perplexity over all windows: exp(total NLL / predicted tokens). Each window predicts its tokens
    2..window from the ones before (no context crosses a window boundary); NLL is summed in float64."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    device = _device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(windows), batch_size), desc=f"perplexity {windows.name}".strip(),
                              unit="batch", disable=not progress, mininterval=5):
                x = windows.ids[start:start + batch_size].to(device)
                logits = model(input_ids=x, use_cache=False).logits
                for row in range(x.shape[0]):  # one row at a time: float32 logits of a big vocabulary are large
                    nll = F.cross_entropy(logits[row, :-1].float(), x[row, 1:], reduction="none")
                    total += float(nll.double().sum())
                    count += nll.numel()
    finally:
        model.train(was_training)
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "windows": len(windows),
            "digest": windows.digest, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------------
# Intent routing by label scoring
# ---------------------------------------------------------------------------------------------------------------
# One example per intent, written for this prompt (not drawn from the traffic templates).
DEFAULT_SHOTS: tuple[tuple[str, str], ...] = (
    ("is the Frieren box set available?", "product_search"),
    ("I loved Vinland Saga, anything similar?", "recommendation"),
    ("my package MA-55120 still hasn't moved", "order_status"),
    ("how much does delivery to Canada cost", "shipping_info"),
    ("volume 4 came with a torn cover, I'd like to send it back", "return_request"),
    ("I got billed twice for the same order", "payment_issue"),
    ("I forgot my password and can't sign in", "account_help"),
    ("hey, thanks a lot!", "chitchat"),
    ("the pay button does nothing when I try to finish my order", "checkout_help"),
    ("this is the third time I'm asking, let me speak to a manager", "escalation"),
)


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class RoutingPrompt:
    """The token ids of the routing prompt. A row's full sequence is prefix_ids + message_ids(text) +
    label_ids[k]; the score of intent k is the log-probability of label_ids[k] given the rest."""

    intents: tuple[str, ...]
    prefix_ids: tuple[int, ...]
    label_ids: tuple[tuple[int, ...], ...]
    tokenizer: object

    def message_ids(self, text: str, max_tokens: int = 256) -> list[int]:
        ids = self.tokenizer(f"Customer: {_one_line(text)}", add_special_tokens=False)["input_ids"][:max_tokens]
        return ids + list(self.tokenizer("\nIntent:", add_special_tokens=False)["input_ids"])


def routing_prompt(tokenizer, intents=INTENTS, shots=DEFAULT_SHOTS) -> RoutingPrompt:
    """Instructions, the intent list and the few-shot examples, then per row "Customer: {text}\\nIntent:";
    each label is scored as " {intent}\\n" (the newline closes the label, so "order" cannot win for
    order_status). A plain completion prompt, no chat template: the same text for base and instruct models."""
    intents = tuple(intents)
    unknown = {lbl for _, lbl in shots} - set(intents)
    if unknown:
        raise ValueError(f"shots use labels that are not intents: {sorted(unknown)}")
    head = ("MangaAssist routes each customer message of an online manga shop to exactly one intent: "
            f"{', '.join(intents)}.\n")
    body = "".join(f"Customer: {_one_line(text)}\nIntent: {label}\n" for text, label in shots)
    prefix = tokenizer(head + body)["input_ids"]  # with BOS where the tokenizer adds one (Llama 3 does)
    if tokenizer.eos_token_id is not None and len(prefix) > 1 and prefix[-1] == tokenizer.eos_token_id:
        prefix = prefix[:-1]
    labels = tuple(tuple(tokenizer(f" {i}\n", add_special_tokens=False)["input_ids"]) for i in intents)
    return RoutingPrompt(intents, tuple(prefix), labels, tokenizer)


def routing_scores(model, prompt: RoutingPrompt, texts: list[str], progress: bool = True) -> np.ndarray:
    """[rows, intents] total log-probability of each label. The shared prefix runs once; per row, a copy of its
    KV cache takes the message, is expanded to one copy per intent, and all labels run as one batch."""
    import torch
    from tqdm.auto import tqdm

    device = _device(model)
    k = len(prompt.intents)
    lengths = [len(ids) for ids in prompt.label_ids]
    width = max(lengths)
    # Right-padded labels: a pad sits after a label's last token, so it never affects that label's score.
    labels = torch.tensor([list(ids) + [ids[-1]] * (width - len(ids)) for ids in prompt.label_ids], device=device)
    first = labels[:, 0]
    out = np.zeros((len(texts), k))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            prefix = model(input_ids=torch.tensor([prompt.prefix_ids], device=device), use_cache=True,
                           logits_to_keep=1).past_key_values
            for r, text in enumerate(tqdm(texts, desc="intent routing", unit="msg", disable=not progress,
                                          mininterval=5)):
                cache = copy.deepcopy(prefix)
                msg = torch.tensor([prompt.message_ids(text)], device=device)
                step = model(input_ids=msg, past_key_values=cache, use_cache=True, logits_to_keep=1)
                score = torch.log_softmax(step.logits[0, -1].float(), -1)[first].double()
                if width > 1:
                    cache = step.past_key_values
                    cache.batch_repeat_interleave(k)
                    logits = model(input_ids=labels[:, :-1], past_key_values=cache, use_cache=True).logits
                    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, 1:, None])[..., 0].double()
                    mask = torch.arange(1, width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
                    score = score + (logp * mask).sum(1)
                out[r] = score.cpu().numpy()
    finally:
        model.train(was_training)
    return out


def _softmax(scores: np.ndarray) -> np.ndarray:
    z = scores - scores.max(1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


def routing_accuracy(model, tokenizer, rows: list[dict], intents=INTENTS, shots=DEFAULT_SHOTS,
                     rare: tuple[str, ...] = ("escalation", "checkout_help"), content_free: str | None = "N/A",
                     progress: bool = True) -> dict:
    """The LLM as an intent router on labelled rows ({"text", "label"}): predicts the intent whose label
    continuation is most likely. Returns accuracy, per-intent accuracy (recall), macro-F1, rare-intent and
    escalation figures, the confusion matrix (counts, rows true, columns predicted, in `intents` order), n,
    predictions and the per-intent scores.

    Small models lean towards some labels whatever the message (the last few-shot example, short labels), so
    with `content_free` set the report adds calibrated_accuracy / calibrated_macro_f1: scores minus those of a
    content-free message (contextual calibration, Zhao et al. 2021), one extra row. The headline accuracy is
    the raw one."""
    from qat_tasks.metrics import classification_report

    intents = list(intents)
    bad = sorted({r["label"] for r in rows} - set(intents))
    if bad:
        raise ValueError(f"rows labelled with intents outside the list: {bad}")
    t0 = time.perf_counter()
    prompt = routing_prompt(tokenizer, intents, shots)
    texts = [r["text"] for r in rows] + ([content_free] if content_free is not None else [])
    scores = routing_scores(model, prompt, texts, progress=progress)
    prior = scores[-1] if content_free is not None else None
    scores = scores[:len(rows)]
    y = np.array([intents.index(r["label"]) for r in rows])
    report = classification_report(y, _softmax(scores), intents, list(rare))  # softmax: confidence for ECE
    report.update({
        "per_intent_accuracy": {i: m["recall"] for i, m in report["per_class"].items() if m["support"]},
        "predictions": [intents[j] for j in scores.argmax(1)],
        "scores": scores,
        "labels": intents,
        "prompt_tokens": len(prompt.prefix_ids),
        "prior_scores": prior,
        "seconds": time.perf_counter() - t0,
    })
    if prior is not None:
        calibrated = classification_report(y, _softmax(scores - prior), intents, list(rare))
        report.update({"calibrated_accuracy": calibrated["accuracy"], "calibrated_macro_f1": calibrated["macro_f1"]})
    return report


# ---------------------------------------------------------------------------------------------------------------
# Generations, size, memory, chart
# ---------------------------------------------------------------------------------------------------------------
def greedy_generations(model, tokenizer, prompts: list[str], max_new_tokens: int = 48,
                       system_prompt: str = SYSTEM_PROMPT) -> list[str]:
    """Greedy (do_sample=False) replies, one prompt at a time (no padding effects), with the chat template and
    the MangaAssist system prompt where the tokenizer has a template, else a "Customer:/Assistant:" prompt.
    Read side by side, they show what perplexity does not: a candidate that lost its manners or its language."""
    import torch

    device = _device(model)
    out = []
    with torch.inference_mode():
        for p in prompts:
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template([{"role": "system", "content": system_prompt},
                                                      {"role": "user", "content": p}],
                                                     tokenize=False, add_generation_prompt=True)
                enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            else:
                enc = tokenizer(f"{system_prompt}\nCustomer: {p}\nAssistant:", return_tensors="pt")
            # Causal LMs take ids and mask only (a BERT-style tokenizer adds token_type_ids).
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=pad)
            out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def dir_size_bytes(path) -> int:
    """Bytes of every regular file under `path` (the checkpoint as it would be uploaded; symlinks not followed)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark since it started, MB (Linux ru_maxrss is KiB).

    It never goes down, so it cannot attribute memory to one step of a long process: run the step in its own
    subprocess (then this is the step's peak), or wrap it in RssSampler for the peak and growth during it."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Samples this process's RSS every `interval_s` on a background thread while the block runs:

        with RssSampler() as mem:
            model = load(...)
        mem.peak_mb, mem.delta_mb   # highest RSS seen, and how far above the RSS at entry it went

    A 50 ms sampler can miss a spike shorter than the interval; it reports what a serving process would hold."""

    def __init__(self, interval_s: float = 0.05):
        import psutil

        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_mb = self.peak_mb = self.end_mb = 0.0
        self.samples = 0

    def _rss_mb(self) -> float:
        return self._proc.memory_info().rss / 2**20

    def _sample(self) -> None:
        rss = self._rss_mb()
        self.samples += 1
        if rss > self.peak_mb:
            self.peak_mb = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> RssSampler:
        self.start_mb = self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.end_mb = self._rss_mb()

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb

    def as_dict(self) -> dict:
        return {"start_mb": self.start_mb, "peak_mb": self.peak_mb, "end_mb": self.end_mb, "delta_mb": self.delta_mb}


def perplexity_vs_size_chart(rows: list[dict], path=None, title: str = "LLM candidates: perplexity vs size on disk"):
    """One point per candidate at (size on disk, perplexity), labelled, for two series: generic held-out text
    and MangaAssist conversations. rows: {"name", "size_bytes" (or "size_mb"), "generic_ppl", "domain_ppl"};
    a missing or None perplexity leaves that point out. Log-scale y: the two series differ by a lot.
    Saved as PNG when `path` is given; returns the Figure (for mlflow.log_figure)."""
    from matplotlib.ticker import ScalarFormatter

    from qat_tasks.plots import plt  # pyplot on the Agg backend

    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label, marker, color in (("generic_ppl", "generic text (held-out Wikipedia/news)", "o", "tab:blue"),
                                      ("domain_ppl", "MangaAssist conversations", "s", "tab:orange")):
        pts = [(r["size_bytes"] / 2**20 if "size_bytes" in r else r["size_mb"], r[key], r["name"])
               for r in rows if r.get(key) is not None]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label,
                   edgecolors="black", zorder=3)
        for x, y, name in pts:
            ax.annotate(f"{name} ({y:.2f})", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlim(left=0)  # the size saving reads at a glance
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
