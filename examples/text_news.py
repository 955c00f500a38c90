"""Text example: Chinese and English news topics, from raw strings to a bundle that predicts strings.

Writes 3,000 generated short news texts (科技 经济 体育 娱乐; mostly Chinese, some English) to
runs/data/news.csv, trains examples/news.yaml (jieba words + a bidirectional GRU), and predicts from
raw strings with the reloaded bundle, as `largo predict BUNDLE --text "..."` does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from largo.data.samples import write_news_csv

HERE = Path(__file__).resolve().parent


def main() -> int:
    import largo

    data = write_news_csv(HERE.parent / "runs" / "data" / "news.csv", n=3000)
    print(f"news written to {data}")
    result = largo.train(HERE / "news.yaml")
    print(f"\ntest accuracy: {result.test['label']['accuracy']:.4f}\nbundle: {result.path}")
    predictor = largo.load(result.path)
    for text in ["这篇文章讨论了股市和银行的利率", "新的芯片让手机更快", "the football league final", ""]:
        r = predictor.predict(text)
        note = f"  {r['warnings']}" if "warnings" in r else ""
        print(f"  {text!r} → {r['label']} (p={r['label_probability']:.3f}){note}")
    return 0 if result.test["label"]["accuracy"] >= 0.85 else 1


if __name__ == "__main__":
    sys.exit(main())
