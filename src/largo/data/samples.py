"""Sample data for the quickstart, the examples and tests, made here or from scikit-learn's bundled copies
(no download): digit images, a bilingual news CSV, and English → Chinese number pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_folder(folder: str | Path) -> Path:
    """Write scikit-learn's 1,797 8×8 digits as PNGs under folder/<digit>/<index>.png.

    Pixel values 0..16 are scaled to 0..255. A folder that already holds all 1,797 images is reused.
    """
    from sklearn.datasets import load_digits

    folder = Path(folder)
    if folder.exists() and sum(1 for _ in folder.rglob("*.png")) == 1797:
        return folder
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        path = folder / str(label) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(img * 255 / 16).astype(np.uint8), mode="L").save(path)
    return folder


def _words(text: str) -> list[str]:
    """Space-separated words → a list (keeps long word lists readable)."""
    return text.split()


_TOPICS = {
    "科技": _words("人工智能 芯片 手机 互联网 软件 机器人 数据 算法 电脑 科学家"),
    "经济": _words("股市 银行 投资 通货膨胀 出口 企业 利率 市场 消费 房价"),
    "体育": _words("足球 篮球 比赛 冠军 球员 教练 奥运会 进球 联赛 训练"),
    "娱乐": _words("电影 明星 音乐 演唱会 综艺 导演 歌手 电视剧 票房 粉丝"),
}
_TOPICS_EN = {
    "科技": _words("software chips phones robots algorithms startups computers internet"),
    "经济": _words("markets banks stocks inflation exports prices interest investors"),
    "体育": _words("football basketball match champion players coach league goals"),
    "娱乐": _words("movie actors music concert singer director series fans"),
}
_FILLER = [
    "今天",
    "我们",
    "认为",
    "这个",
    "非常",
    "一些",
    "已经",
    "可能",
    "因为",
    "所以",
    "表示",
    "报道",
    "记者",
    "最近",
    "关于",
]
_FILLER_EN = [
    "today",
    "the",
    "report",
    "says",
    "that",
    "this",
    "week",
    "many",
    "people",
    "think",
    "about",
    "new",
    "some",
    "very",
]


def news_rows(n: int, seed: int = 0, english_share: float = 0.3) -> list[dict[str, str]]:
    """Generated short news texts in four topics (科技 经济 体育 娱乐), mostly Chinese, some English.

    Each text mixes two or three topic words into filler words, so a model must find the topic words;
    about 5% of the labels are flipped, so no model reaches 100%.
    """
    rng = np.random.default_rng(seed)
    labels = list(_TOPICS)
    rows = []
    for _ in range(n):
        label = labels[rng.integers(len(labels))]
        english = rng.random() < english_share
        topic, filler = (_TOPICS_EN[label], _FILLER_EN) if english else (_TOPICS[label], _FILLER)
        words = list(rng.choice(filler, rng.integers(4, 12))) + list(rng.choice(topic, rng.integers(2, 4)))
        rng.shuffle(words)
        text = (" " if english else "").join(words) + ("." if english else "。")
        if rng.random() < 0.05:
            label = labels[rng.integers(len(labels))]
        rows.append({"text": text, "label": label})
    return rows


def write_news_csv(path: str | Path, n: int = 2000, seed: int = 0) -> Path:
    """Write `news_rows(n, seed)` as a UTF-8 CSV with columns text,label."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_words("text label"))
        writer.writeheader()
        writer.writerows(news_rows(n, seed))
    return path


# English number words → Chinese numerals: a small, exactly checkable translation task (seq2seq)
_ONES = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
)
_TENS = _words("_ _ twenty thirty forty fifty sixty seventy eighty ninety")
_ZH_DIGITS = "零一二三四五六七八九"


def english_number(n: int) -> str:
    """0 ≤ n < 1,000,000 in English words: 'four thousand two hundred forty-two'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + english_number(n % 100))
    return english_number(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + english_number(n % 1000))


def chinese_number(n: int) -> str:
    """0 ≤ n < 10,000 in Chinese numerals: 四千二百四十二, 一千零五, 十五."""
    if n == 0:
        return "零"
    if 10 <= n < 20:
        return "十" + ("" if n == 10 else _ZH_DIGITS[n % 10])
    digits = [int(d) for d in str(n)]
    units = ["千", "百", "十", ""][-len(digits) :]
    out, gap = "", False
    for d, unit in zip(digits, units, strict=True):
        if d == 0:
            gap = True
            continue
        out += ("零" if gap and out else "") + _ZH_DIGITS[d] + unit
        gap = False
    return out


def number_pairs(n: int, seed: int = 0, below: int = 10_000) -> list[dict[str, str]]:
    """`n` distinct numbers below `below` as {"english": words, "chinese": numerals} rows."""
    numbers = np.random.default_rng(seed).choice(below, size=n, replace=False)
    return [{"english": english_number(int(k)), "chinese": chinese_number(int(k))} for k in numbers]


def write_number_pairs(path: str | Path, n: int = 4000, seed: int = 0) -> Path:
    """Write `number_pairs` as a UTF-8 TSV with the columns english and chinese."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["english\tchinese"] + [f"{r['english']}\t{r['chinese']}" for r in number_pairs(n, seed)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
