"""Sample data written from scikit-learn's bundled copies (no download), for the quickstart and tests."""

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
