"""Generator of realistic MangaAssist traffic in the logged-record schema.

No real intent dataset exists for a manga shop, so this writes what the serving layer would log:
ten intents with a realistic imbalance (escalation and checkout_help rare), slot values (titles,
volumes, order numbers), typos, emoji, informal and non-English messages, multi-turn conversations,
personal data that calibration must scrub, a served model that is sometimes wrong (lower confidence
when it is), a share of turns reviewed by people, client retries that log a request twice and,
optionally, corrupted lines. Output: date-partitioned JSONL (optionally gzip) in a folder or on S3.

Drift profiles (`generate(..., drift="catalogue_launch")`) write traffic that has moved away from the
default, for exercising the drift monitor (qat_tasks.monitoring.drift):

  catalogue_launch   a new catalogue goes live with international shipping: customers ask about titles and
                     formats the models never saw (light novels, slipcase sets, launch bundles), pre-order
                     checkouts and payments break (checkout_help 12 %, payment_issue 15 % of conversations,
                     with launch-specific messages), a third of the customers write in another language
                     (Korean and Chinese join the usual five) and a quarter of the messages are long.

Without a profile the generator is unchanged: the same seed writes the same bytes as before profiles existed.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from qat_tasks.core import storage
from qat_tasks.core.schema import INTENTS, SCHEMA_VERSION
from qat_tasks.data.catalogue import FORMATS, GENRES, TITLES

# Share of conversations by opening intent.
INTENT_SHARE = {
    "product_search": 0.22,
    "recommendation": 0.15,
    "order_status": 0.15,
    "shipping_info": 0.10,
    "return_request": 0.08,
    "payment_issue": 0.07,
    "account_help": 0.07,
    "chitchat": 0.115,
    "checkout_help": 0.02,
    "escalation": 0.015,
}
assert set(INTENT_SHARE) == set(INTENTS)

CARRIERS = ["UPS", "FedEx", "DHL", "USPS", "Japan Post"]
EMOJI = ["😭", "🙏", "😡", "🔥", "📦", "😅", "❤️", "🤔", "👍", "💢"]
STREETS = ["Maple Street", "Oak Avenue", "Sakura Lane", "Pine Road", "Elm Drive", "Cedar Court", "Willow Way"]
CITIES = ["Springfield, IL 62704", "Portland, OR 97205", "Austin, TX 78701", "Seattle, WA 98101"]
NAMES = ["jane.doe", "kenji.sato", "mlopez", "otaku_dan", "sakura.t", "b.nguyen", "alex99", "yuki.m"]
DOMAINS = ["gmail.com", "yahoo.co.jp", "outlook.com", "proton.me", "icloud.com"]

TEMPLATES: dict[str, list[str]] = {
    "product_search": [
        "do you have {title} volume {vol}", "is {title} vol {vol} in stock", "looking for the {title} {fmt}",
        "how much is {title} volume {vol}?", "{title} vol. {vol} available in english?", "search {title}",
        "when does {title} volume {vol} come out", "do u sell the {title} {fmt}", "got any {title} left?",
        "I need volumes {vol} to {vol2} of {title}", "price check on {title} {fmt} please",
        "is the {title} {fmt} back in stock yet", "can I preorder {title} volume {vol}",
    ],
    "recommendation": [
        "what should I read after {title}", "recommend something like {title}", "any good {genre} manga?",
        "my kid loved {title}, what next?", "best {genre} series for a beginner?",
        "I finished {title} and need something similar", "suggest a {genre} manga that's completed",
        "what's popular right now in {genre}", "gift ideas for someone who likes {title}",
        "something darker than {title}?", "top 5 {genre} manga pls",
    ],
    "order_status": [
        "where is my order {order}", "order {order} hasn't arrived", "status of order {order}?",
        "can you check order {order}", "my {title} order still says processing", "has {order} shipped yet",
        "tracking for {order} isn't updating", "when will order {order} arrive",
        "it's been 2 weeks, where is {order}", "order {order} shows delivered but I don't have it",
    ],
    "shipping_info": [
        "do you ship to {country}?", "how long is shipping to {country}", "shipping cost for a {fmt}?",
        "do you use {carrier}", "is there free shipping over $50", "can I get express delivery",
        "do you ship internationally", "what carrier do you use for {country}",
        "can I change my shipping address to {address}", "ship to {address} instead please",
    ],
    "return_request": [
        "I want to return {title} volume {vol}", "the {fmt} arrived damaged, can I return it",
        "how do I return order {order}", "wrong volume sent, I ordered vol {vol} of {title}",
        "refund for {order} please", "the spine of {title} vol {vol} is bent, exchange?",
        "can I send back the {fmt}", "return policy for opened box sets?",
    ],
    "payment_issue": [
        "my card was charged twice for {order}", "payment declined but money left my account",
        "card {card} keeps getting declined", "why was I charged for {order} twice",
        "paypal payment failed", "can I pay with a gift card", "refund hasn't hit my card for {order}",
        "the price changed after I paid", "I was billed but the order {order} was cancelled",
    ],
    "account_help": [
        "I can't log in", "reset my password please", "change my email to {email}",
        "my account is locked", "update phone number to {phone}", "how do I delete my account",
        "I never got the verification email at {email}", "can't access my wishlist",
        "merge my two accounts, the other one is {email}", "update my address to {address}",
    ],
    "chitchat": [
        "hi", "hello!", "thanks!", "you're awesome", "lol", "good morning", "who are you?",
        "are you a bot", "thank you so much", "ok", "bye", "what's your favorite manga?", "nice",
        "haha ok", "hey there", "cool thanks",
    ],
    "checkout_help": [
        "the checkout button doesn't work", "promo code {promo} isn't applying", "stuck on the payment page",
        "can't complete checkout, it keeps spinning", "how do I apply a coupon at checkout",
        "checkout says my cart is empty but it isn't", "error at checkout when I add {title} {fmt}",
        "can I split payment at checkout", "the place order button is greyed out",
        "checkout crashes on {device} when I pay for {title} vol {vol}", "{browser} won't let me finish checkout",
        "cart total shows ${amount} but checkout charges more", "can't check out with {title} {fmt} in my cart",
        "checkout asks for a zip code and rejects mine on {device}", "gift wrap option breaks checkout for {title}",
        "I get error {errcode} at checkout", "checkout page freezes after I enter promo {promo} on {browser}",
    ],
    "escalation": [
        "I want to talk to a human", "this is ridiculous, get me a manager", "connect me to a real person NOW",
        "third time asking about {order}, I'm done", "worst service ever, I want a supervisor",
        "stop giving me bot answers, agent please", "I'm filing a complaint about order {order}",
        "you people lost my {fmt} and nobody helps", "escalate this, I've waited weeks for {order}",
        "if I don't get a refund today I'm disputing the charge",
        "I've been charged ${amount} for nothing, give me a person", "your bot is useless, human for order {order}",
        "I need a supervisor about {title} vol {vol}, this is the {nth} time", "escalate {order} to a manager right now",
        "nobody answers my emails about {order}, I want someone real", "I'm reporting you, {order} never came",
    ],
}
assert set(TEMPLATES) == set(INTENTS)

# Non-English messages (about 6 % of traffic): Japanese, Spanish, French, German, Portuguese.
FOREIGN: dict[str, list[tuple[str, str]]] = {
    "product_search": [("ja-JP", "{title}の{vol}巻は在庫ありますか"), ("es-MX", "¿tienen {title} tomo {vol}?"),
                       ("fr-FR", "avez-vous {title} tome {vol} ?"), ("de-DE", "habt ihr {title} band {vol}?")],
    "recommendation": [("ja-JP", "{title}みたいな漫画を教えて"), ("es-ES", "recomiéndame algo como {title}"),
                       ("pt-BR", "me recomenda um mangá parecido com {title}")],
    "order_status": [("ja-JP", "注文{order}はいつ届きますか"), ("es-MX", "¿dónde está mi pedido {order}?"),
                     ("de-DE", "wo ist meine bestellung {order}?"), ("fr-FR", "où en est ma commande {order} ?")],
    "shipping_info": [("ja-JP", "{country}に発送できますか"), ("pt-BR", "vocês entregam no {country}?"),
                      ("es-ES", "¿cuánto cuesta el envío a {country}?")],
    "return_request": [("ja-JP", "{title}を返品したいです"), ("fr-FR", "je veux retourner {title} tome {vol}"),
                       ("es-MX", "quiero devolver el pedido {order}")],
    "payment_issue": [("ja-JP", "二重に請求されました"), ("de-DE", "meine zahlung wurde zweimal abgebucht"),
                      ("es-ES", "me cobraron dos veces el pedido {order}")],
    "account_help": [("ja-JP", "ログインできません"), ("fr-FR", "je n'arrive pas à me connecter"),
                     ("pt-BR", "esqueci minha senha")],
    "chitchat": [("ja-JP", "こんにちは"), ("es-MX", "hola"), ("fr-FR", "merci beaucoup"), ("de-DE", "danke!"),
                 ("pt-BR", "obrigado")],
    "checkout_help": [("ja-JP", "決済画面から進めません"), ("es-ES", "no puedo finalizar la compra"),
                      ("de-DE", "der gutscheincode {promo} funktioniert nicht")],
    "escalation": [("ja-JP", "担当者と話させてください"), ("es-MX", "quiero hablar con una persona real"),
                   ("fr-FR", "je veux parler à un responsable, c'est inadmissible")],
}
COUNTRIES = ["Canada", "Germany", "Brazil", "Japan", "the UK", "Australia", "Mexico", "France", "Spain"]

# After one turn, what the customer says next (conversations drift, and frustration escalates).
FOLLOW_UP = {
    "order_status": {"escalation": 0.12, "shipping_info": 0.2, "chitchat": 0.3, "return_request": 0.1},
    "product_search": {"checkout_help": 0.06, "product_search": 0.4, "recommendation": 0.2, "chitchat": 0.2},
    "payment_issue": {"escalation": 0.15, "checkout_help": 0.15, "chitchat": 0.3},
    "return_request": {"escalation": 0.1, "order_status": 0.2, "chitchat": 0.3},
    "chitchat": {"product_search": 0.4, "recommendation": 0.3, "order_status": 0.2},
}
# How often the served INT8 model gets each intent right; rare intents suffer most.
SERVED_ACCURACY = {i: 0.93 for i in INTENTS} | {"checkout_help": 0.8, "escalation": 0.82, "chitchat": 0.96}
CONFUSIONS = {
    "checkout_help": ["payment_issue", "product_search"], "escalation": ["order_status", "return_request", "chitchat"],
    "shipping_info": ["order_status"], "order_status": ["shipping_info"], "return_request": ["order_status"],
    "recommendation": ["product_search"], "product_search": ["recommendation"], "payment_issue": ["checkout_help"],
}

REVIEWED_FRACTION = 0.35
LONG_MESSAGE_RATE = 0.04


@dataclass(frozen=True)
class Profile:
    """What the customers ask and how: the default, or a drift profile."""

    intent_share: dict[str, float]
    titles: list[str]
    formats: list[str]
    templates: dict[str, list[str]]
    foreign: dict[str, list[tuple[str, str]]]
    non_english_rate: float
    long_rate: float


# A new catalogue: titles and formats the shop did not sell before (listed three times: the launch dominates).
LAUNCH_TITLES = ["Kagurabachi", "Ichi the Witch", "Gachiakuta", "Akane-banashi", "Centuria", "Blue Box",
                 "The Elusive Samurai", "Mission: Yozakura Family", "Undead Unluck", "Hell's Paradise",
                 "Shangri-La Frontier", "Ruri Dragon"]
LAUNCH_FORMATS = ["light novel", "limited-edition slipcase set", "artbook", "signed variant cover",
                  "launch bundle with acrylic stand", "webtoon print edition"]
LAUNCH_TEMPLATES: dict[str, list[str]] = {
    "checkout_help": [
        "the {title} launch bundle pre-order won't go through checkout, it says the {fmt} is unavailable in my region",
        "checkout keeps removing the {fmt} of {title} from my cart right before I pay on {device}",
        "I can't select international shipping at checkout for the {title} {fmt}, the country list is empty",
        "the pre-order checkout for {title} vol {vol} asks for a release-date confirmation and then errors with {errcode}",
    ],
    "payment_issue": [
        "I was charged ${amount} for the {title} {fmt} pre-order but never got a confirmation email",
        "my card got declined for the {title} launch bundle, but the bank says the payment went through",
        "the pre-order deposit for {title} vol {vol} was taken twice and the second charge is in yen",
        "why does the {fmt} of {title} cost ${amount} at payment when the launch page said less",
    ],
    "product_search": [
        "is the {title} {fmt} part of the new catalogue, and will volume {vol} ship internationally",
        "do you carry the {title} {fmt} from the launch event",
    ],
}
LAUNCH_FOREIGN: dict[str, list[tuple[str, str]]] = {
    "product_search": [("ko-KR", "{title} {vol}권 재고 있나요?"), ("zh-TW", "請問{title}第{vol}集有貨嗎")],
    "checkout_help": [("ko-KR", "결제 페이지에서 주문이 완료되지 않아요"), ("zh-TW", "結帳時一直出現錯誤{errcode}")],
    "payment_issue": [("ko-KR", "{title} 예약 주문이 두 번 결제됐어요"), ("zh-TW", "預購{title}被重複扣款")],
    "order_status": [("ko-KR", "주문 {order} 언제 도착하나요?"), ("zh-TW", "訂單{order}什麼時候到")],
}


def _launch_share() -> dict[str, float]:
    share = {"checkout_help": 0.12, "payment_issue": 0.15}
    rest = {k: v for k, v in INTENT_SHARE.items() if k not in share}
    scale = (1 - sum(share.values())) / sum(rest.values())
    return {k: share.get(k, INTENT_SHARE[k] * scale) for k in INTENT_SHARE}


PROFILES: dict[str, Profile] = {
    "catalogue_launch": Profile(
        intent_share=_launch_share(), titles=LAUNCH_TITLES * 3 + TITLES, formats=LAUNCH_FORMATS * 2 + FORMATS,
        templates={k: v + LAUNCH_TEMPLATES.get(k, []) for k, v in TEMPLATES.items()},
        foreign={k: v + LAUNCH_FOREIGN.get(k, []) for k, v in FOREIGN.items()},
        non_english_rate=0.35, long_rate=0.25),
}


def profile(drift: str | None, non_english_rate: float = 0.06) -> Profile:
    """The default traffic, or the named drift profile."""
    if drift is None:
        return Profile(INTENT_SHARE, TITLES, FORMATS, TEMPLATES, FOREIGN, non_english_rate, LONG_MESSAGE_RATE)
    if drift not in PROFILES:
        raise ValueError(f"unknown drift profile {drift!r}; known: {sorted(PROFILES)}")
    return PROFILES[drift]


class TrafficGenerator:
    def __init__(self, seed: int = 0, non_english_rate: float = 0.06, pii_rate: float = 0.08,
                 duplicate_rate: float = 0.01, corrupt_rate: float = 0.0, drift: str | None = None):
        self.rng = random.Random(seed)
        # The default profile draws exactly as the generator always has: existing seeds keep their output.
        self.profile = profile(drift, non_english_rate)
        self.non_english_rate = self.profile.non_english_rate
        self.pii_rate = pii_rate
        self.duplicate_rate = duplicate_rate
        self.corrupt_rate = corrupt_rate
        self.stats: Counter = Counter()

    # -- text ------------------------------------------------------------------------------------------
    def _slots(self) -> dict[str, str]:
        r = self.rng
        vol = r.randint(1, 110)
        return {
            "title": r.choice(self.profile.titles), "vol": str(vol), "vol2": str(vol + r.randint(1, 8)),
            "fmt": r.choice(self.profile.formats),
            "genre": r.choice(GENRES), "carrier": r.choice(CARRIERS), "country": r.choice(COUNTRIES),
            "order": r.choice(["MA-2026-", "MA-", "#"]) + str(r.randint(100000, 99999999)),
            "promo": r.choice(["MANGA10", "SUMMER25", "OTAKU5", "FREESHIP", "VOL1FREE", "BOXSET15"]),
            "device": r.choice(["iphone", "android", "my ipad", "the app", "my laptop", "a chromebook"]),
            "browser": r.choice(["safari", "chrome", "firefox", "edge", "the mobile site"]),
            "amount": f"{r.randint(8, 240)}.{r.randint(0, 99):02d}", "errcode": f"E{r.randint(100, 999)}",
            "nth": r.choice(["third", "fourth", "fifth", "tenth"]),
            "email": self._email(), "phone": self._phone(), "address": self._address(), "card": self._card(),
        }

    def _email(self) -> str:
        return f"{self.rng.choice(NAMES)}{self.rng.randint(1, 99)}@{self.rng.choice(DOMAINS)}"

    def _phone(self) -> str:
        r = self.rng
        return r.choice([f"({r.randint(200, 999)}) {r.randint(200, 999)}-{r.randint(1000, 9999)}",
                         f"+81 90-{r.randint(1000, 9999)}-{r.randint(1000, 9999)}",
                         f"{r.randint(200, 999)}.{r.randint(200, 999)}.{r.randint(1000, 9999)}"])

    def _address(self) -> str:
        return f"{self.rng.randint(10, 9999)} {self.rng.choice(STREETS)}, {self.rng.choice(CITIES)}"

    def _card(self) -> str:
        return " ".join(str(self.rng.randint(1000, 9999)) for _ in range(4))

    def _pii_suffix(self, slots: dict[str, str]) -> str:
        kind = self.rng.choice(["email", "phone", "address"])
        self.stats[f"pii_{kind}"] += 1
        return self.rng.choice({
            "email": [" my email is {email}", " (email: {email})", ", reach me at {email}"],
            "phone": [" call me at {phone}", ", my number is {phone}"],
            "address": [" I live at {address}", ", ship to {address}"],
        }[kind]).format(**slots)

    def _noise(self, text: str) -> str:
        r = self.rng
        if r.random() < 0.35:
            text = text.lower()
        if r.random() < 0.12 and len(text) > 6:  # a typo: swap, drop or double a character
            i = r.randrange(1, len(text) - 1)
            op = r.randrange(3)
            text = (text[:i] + text[i + 1] + text[i] + text[i + 2:] if op == 0 else
                    text[:i] + text[i + 1:] if op == 1 else text[:i] + text[i] + text[i:])
            self.stats["typo"] += 1
        if r.random() < 0.10:
            text = text.replace("you", "u").replace("please", "pls").replace("thanks", "thx")
        if r.random() < 0.12:
            text = f"{text} {r.choice(EMOJI)}"
            self.stats["emoji"] += 1
        if r.random() < self.profile.long_rate:  # a long, rambling message
            text = f"{text}. " + " ".join(r.choice(self.profile.templates[r.choice(INTENTS)]).format(**self._slots())
                                          for _ in range(4))
        return text

    def utterance(self, intent: str) -> tuple[str, str]:
        """(text, locale) for one customer message with this intent."""
        slots = self._slots()
        if self.rng.random() < self.non_english_rate:
            locale, tpl = self.rng.choice(self.profile.foreign[intent])
            self.stats["non_english"] += 1
            return tpl.format(**slots), locale
        text = self._noise(self.rng.choice(self.profile.templates[intent]).format(**slots))
        if "{email}" not in text and self.rng.random() < self.pii_rate and intent != "chitchat":
            text += self._pii_suffix(slots)
        return text, "en-US"

    # -- records ---------------------------------------------------------------------------------------
    def _served(self, intent: str) -> tuple[str, float]:
        r = self.rng
        if r.random() < SERVED_ACCURACY[intent]:
            return intent, round(min(0.999, r.betavariate(12, 1.6)), 4)
        wrong = r.choice(CONFUSIONS.get(intent, [i for i in INTENTS if i != intent]))
        return wrong, round(r.betavariate(4, 3), 4)

    def conversation(self, start: datetime) -> Iterator[dict]:
        r = self.rng
        share = self.profile.intent_share
        intent = r.choices(list(share), weights=list(share.values()))[0]
        conv_id = f"conv-{uuid.UUID(int=r.getrandbits(128)).hex[:16]}"
        ts = start
        n_turns = r.choices([1, 2, 3, 4], weights=[0.5, 0.28, 0.14, 0.08])[0]
        for turn in range(n_turns):
            text, locale = self.utterance(intent)
            served, conf = self._served(intent)
            self.stats[f"intent_{intent}"] += 1
            yield {
                "schema_version": SCHEMA_VERSION, "event": "quantized_inference",
                "request_id": f"req-{uuid.UUID(int=r.getrandbits(128)).hex}", "conversation_id": conv_id,
                "turn": turn, "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                "model": "intent-distilbert-int8-v02", "runtime": "onnxruntime", "text": text,
                "intent": served, "confidence": conf, "latency_ms": round(r.lognormvariate(1.9, 0.3), 2),
                "reviewed_label": intent if r.random() < REVIEWED_FRACTION else None, "locale": locale,
            }
            ts += timedelta(seconds=r.randint(5, 240))
            nxt = FOLLOW_UP.get(intent, {"chitchat": 0.4})
            stay = max(0.0, 1 - sum(nxt.values()))
            intent = r.choices([*nxt, intent], weights=[*nxt.values(), stay])[0]

    def day_lines(self, day: date, records: int) -> Iterator[str]:
        """JSONL lines for one day: about `records` records, in time order, with retries and corruption."""
        r = self.rng
        base = datetime(day.year, day.month, day.day, tzinfo=UTC)
        made = 0
        lines: list[tuple[str, str]] = []
        while made < records:
            start = base + timedelta(seconds=r.randint(0, 86399 - 1200))
            for rec in self.conversation(start):
                line = json.dumps(rec, ensure_ascii=False)
                lines.append((rec["timestamp"], line))
                made += 1
                if r.random() < self.duplicate_rate:  # a client retry logs the same request again
                    lines.append((rec["timestamp"], line))
                    self.stats["duplicate_request"] += 1
        lines.sort(key=lambda t: t[0])
        for _, line in lines:
            if self.corrupt_rate and r.random() < self.corrupt_rate:
                line = self._corrupt(line)
            yield line

    def _corrupt(self, line: str) -> str:
        rec = json.loads(line)
        kind = self.rng.randrange(6)
        self.stats[f"corrupt_{kind}"] += 1
        if kind == 0:
            return line[: len(line) // 2]  # truncated write
        if kind == 1:
            rec["confidence"] = str(rec["confidence"])  # wrong type
        elif kind == 2:
            del rec["text"]  # an old serving build that did not log text
        elif kind == 3:
            rec["intent"] = "weather"  # not one of ours
        elif kind == 4:
            rec["text"] = "   "
        else:
            rec["timestamp"] = rec["timestamp"].rstrip("Z")  # naive timestamp
        return json.dumps(rec, ensure_ascii=False)


def generate(out: str, start: date, end: date, records_per_day: int, seed: int = 0, compress: bool = True,
             corrupt_rate: float = 0.0, files_per_day: int = 1, endpoint_url: str | None = None,
             progress: bool = False, drift: str | None = None) -> Counter:
    """Write [start, end) of traffic under `out` (folder or s3:// prefix) as dt=YYYY-MM-DD/ partitions; `drift`
    names a drift profile (PROFILES), None the usual traffic."""
    gen = TrafficGenerator(seed=seed, corrupt_rate=corrupt_rate, drift=drift)
    days = [start + timedelta(days=i) for i in range((end - start).days)]
    if progress:
        from tqdm import tqdm

        days = tqdm(days, desc="generating traffic", unit="day")
    for day in days:
        lines = list(gen.day_lines(day, records_per_day))
        gen.stats["lines"] += len(lines)
        chunk = -(-len(lines) // files_per_day)
        for part in range(files_per_day):
            body = "\n".join(lines[part * chunk:(part + 1) * chunk]) + "\n"
            name = f"dt={day.isoformat()}/traffic-{part:04d}.jsonl" + (".gz" if compress else "")
            data = storage.gzip_bytes(body) if compress else body.encode("utf-8")
            storage.write_bytes(storage.join(out, name), data, endpoint_url)
    return gen.stats
