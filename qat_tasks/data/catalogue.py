"""The shop's product catalogue: titles, genres, formats and prices. The reranker's candidate passages are entries
of it, and the traffic generator asks for its products."""

from __future__ import annotations

import hashlib
import re

TITLES = [
    "One Piece", "Naruto", "Attack on Titan", "Demon Slayer", "Jujutsu Kaisen", "Chainsaw Man", "Spy x Family",
    "My Hero Academia", "Berserk", "Vagabond", "Frieren", "Blue Lock", "Oshi no Ko", "Dandadan", "Vinland Saga",
    "Tokyo Ghoul", "Fullmetal Alchemist", "Death Note", "Haikyu!!", "One-Punch Man", "Kaiju No. 8", "Monster",
    "Slam Dunk", "Nana", "Fruits Basket", "Sailor Moon", "Dragon Ball", "Bleach", "Hunter x Hunter", "Akira",
    "Mob Psycho 100", "Goodnight Punpun", "Yotsuba&!", "Witch Hat Atelier", "Sakamoto Days", "Black Clover",
    "The Apothecary Diaries", "Blue Period", "Dorohedoro", "Solo Leveling",
]


GENRES = ["shonen", "seinen", "shojo", "isekai", "horror", "romance", "sports", "slice of life", "mecha", "dark fantasy"]


FORMATS = ["paperback", "box set", "omnibus", "hardcover deluxe edition", "digital edition", "collector's edition"]


_VOL = re.compile(r"(?:\bvol(?:ume)?s?\.?|\btomo|\btome|\bband)\s*(\d{1,3})|(\d{1,3})\s*巻", re.IGNORECASE)


PRICES = {"paperback": 10.99, "box set": 89.99, "omnibus": 24.99, "hardcover deluxe edition": 39.99,
          "digital edition": 7.99, "collector's edition": 59.99}


def describe_product(title: str, vol: int, fmt: str) -> str:
    """A catalog entry as the reranker sees it."""
    genre = GENRES[int(hashlib.sha256(title.encode()).hexdigest(), 16) % len(GENRES)]
    return f"{title} volume {vol}, {fmt}. {genre} manga, ${PRICES.get(fmt, 12.99):.2f}, ships in 2-4 days."


def product_asked(text: str) -> tuple[str, int, str] | None:
    """(title, volume, format) a product search asks for; volume 1 and paperback when it does not say."""
    low = text.lower()
    titles = [t for t in TITLES if t.lower() in low]
    if not titles:
        return None
    title = max(titles, key=len)
    m = _VOL.search(text)
    fmts = [f for f in FORMATS if f in low]
    return title, int(next(g for g in m.groups() if g)) if m else 1, max(fmts, key=len) if fmts else "paperback"
