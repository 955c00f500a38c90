"""Generated ids become text pieces: the pieces join to the text of all the ids, never end inside a
character, and each push decodes a short window rather than the whole stream."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from largo.data.corpus import new_byte_bpe
from largo.deploy.lm_text import TextPieces, text_pieces

TEXTS = [f"人民日报 {i} 号：今天天气很好，the quick brown fox jumps over {i} lazy dogs." for i in range(300)]


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    tok = new_byte_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS, trainer)
    return tok


class Counting:
    """A tokenizer that records how many ids each decode call was given."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids: list[int], **kwargs) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_pieces_join_to_the_whole_text_and_never_split_a_character(byte_bpe: Tokenizer) -> None:
    rng = random.Random(0)
    vocab = byte_bpe.get_vocab_size()
    text_ids = byte_bpe.encode(" ".join(TEXTS[:20])).ids
    for case in range(200):
        if case % 2:  # any ids at all: stray bytes, cut characters, the special token
            ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 60))]
        else:  # real text cut anywhere
            start = rng.randrange(len(text_ids))
            ids = text_ids[start : start + rng.randint(1, 80)]
        pieces = list(text_pieces(ids, byte_bpe))
        assert "".join(pieces) == byte_bpe.decode(ids, skip_special_tokens=False)
        assert all(pieces) and not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_a_chinese_character_split_over_tokens_comes_out_whole(byte_bpe: Tokenizer) -> None:
    ids = byte_bpe.encode("a龘b").ids  # 龘 is not in the corpus: its three bytes are three tokens
    assert len(ids) == 5
    pieces = TextPieces(byte_bpe)
    out = [pieces.push(i) for i in ids] + [pieces.end()]
    assert out == ["a", "", "", "龘", "b", ""]


def test_each_push_decodes_a_short_window_not_the_whole_stream(byte_bpe: Tokenizer) -> None:
    ids = byte_bpe.encode(" ".join(TEXTS)).ids
    assert len(ids) > 3000
    counting = Counting(byte_bpe)
    text = "".join(text_pieces(ids, counting))  # type: ignore[arg-type]
    assert text == byte_bpe.decode(ids)
    assert max(counting.lengths) <= 8  # a whole-stream decode would reach len(ids)


def test_a_decoder_that_drops_a_leading_space_still_joins_to_the_whole_text() -> None:
    tok = Tokenizer(models.WordLevel({"▁hello": 0, "▁world": 1, "!": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()  # strips the space before the first word only
    ids = [0, 1, 2, 0, 1]
    assert tok.decode(ids) == "hello world! hello world"
    assert "".join(text_pieces(ids, tok)) == tok.decode(ids)
