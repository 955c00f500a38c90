"""Built-in stop-word lists for text normalization (`normalize.stopwords: english | chinese | both`).

English comes from scikit-learn's list (the one TfidfVectorizer uses). The Chinese list holds common
function words and particles; negations (不, 没, 没有, 别, 无, 非) are deliberately left out because
removing them flips the meaning of a review.
"""

from __future__ import annotations

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS


def _words(text: str) -> list[str]:
    """Space-separated words → a list (keeps long word lists readable)."""
    return text.split()


CHINESE_STOP_WORDS = frozenset(
    _words(
        """的 了 着 过 地 得 之 和 与 及 或 而 且 并 也 就 都 又 还 才 再 只 则 即 便 把 被 让 给 向
        往 从 自 在 于 对 为 以 因 由 由于 因为 所以 但是 但 而且 并且 然后 如果 虽然 这 那 这个 那个
        这些 那些 这样 那样 这里 那里 哪 哪里 什么 怎么 怎样 谁 我 你 他 她 它 我们 你们 他们 她们 它们
        咱们 自己 啊 吧 呢 吗 嘛 呀 哦 哈 嗯 啦 么 一个 一些 一种 每 各 某 其 其他 其中 等 等等 是 有
        个 们 来 去 上 下 中 里 很 太 更 最"""
    )
)

# single characters that are particles almost everywhere they occur, so removing them from unsegmented
# text (char / bpe / wordpiece tokenizers) does not cut content words apart; other single-character
# stop words (上, 中, 是 …) are removed only after jieba has segmented the text into words
PARTICLES = frozenset(_words("""的 了 着 吗 呢 吧 啊 呀 嘛 哦 啦 么 哈 嗯"""))

BUILT_IN = {
    "english": frozenset(ENGLISH_STOP_WORDS),
    "chinese": CHINESE_STOP_WORDS,
    "both": frozenset(ENGLISH_STOP_WORDS) | CHINESE_STOP_WORDS,
}


def stopword_set(choice: str | list[str]) -> frozenset[str]:
    """The words a `normalize.stopwords` setting removes ('none' → empty)."""
    if isinstance(choice, list):
        return frozenset(w.strip() for w in choice if w.strip())
    return BUILT_IN.get(choice, frozenset())


def substring_safe(words: frozenset[str]) -> frozenset[str]:
    """The stop words that can be removed from unsegmented text without cutting other words apart."""
    return frozenset(w for w in words if w.isascii() or len(w) > 1 or w in PARTICLES)
