"""Seq2seq example: English number words → Chinese numerals, from a TSV of pairs to a bundle that
translates strings.

Writes 4,000 pairs ("four thousand two hundred forty-two" → 四千二百四十二) to
runs/data/numbers_en_zh.tsv, trains examples/seq2seq/numbers.yaml (a small Transformer encoder-decoder
with a shared byte-level BPE), prints the test BLEU and chrF, and translates numbers the run never saw
with the reloaded bundle, as `largo generate BUNDLE "..."` does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from largo.data.samples import chinese_number, english_number, write_number_pairs

HERE = Path(__file__).resolve().parent


def main() -> int:
    import largo

    data = write_number_pairs(HERE.parent / "runs" / "data" / "numbers_en_zh.tsv", n=4000)
    print(f"pairs written to {data}")
    result = largo.train(HERE / "seq2seq" / "numbers.yaml")
    test = result.test["chinese"]
    print(f"\ntest chrF {test['chrf']:.1f}  BLEU {test['bleu']:.1f}  exact {test['exact_match']:.3f}")
    print(f"bundle: {result.path}")
    translator = largo.load(result.path)
    seen = set(data.read_text(encoding="utf-8").splitlines())
    unseen = [
        n for n in (7, 64, 305, 1010, 2026, 9999) if f"{english_number(n)}\t{chinese_number(n)}" not in seen
    ]
    for n, out in zip(unseen, translator.translate([english_number(n) for n in unseen]), strict=True):
        mark = "" if out == chinese_number(n) else f"   (right: {chinese_number(n)})"
        print(f"  {english_number(n)!r} → {out}{mark}")
    return 0 if test["chrf"] >= 90 else 1


if __name__ == "__main__":
    sys.exit(main())
