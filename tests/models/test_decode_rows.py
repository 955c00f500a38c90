"""Continuous batching at the model level: `GPTRows` and `Seq2SeqRows` decode many sequences at positions of
their own, joining and leaving at any step, and each row's logits are the ones its sequence gets alone."""

import random

import pytest
import torch

from largo.config_lm import GPTConfig
from largo.config_seq2seq import Seq2SeqModelConfig
from largo.models.gpt import GPT, GPTRows
from largo.models.layers import SlotKVCache
from largo.models.seq2seq import BOS, NEVER, PAD, Seq2SeqRows, Seq2SeqTransformer


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=61, dim=32, layers=2, heads=4, context=20)).double().eval()


def _seq2seq() -> Seq2SeqTransformer:
    torch.manual_seed(0)
    cfg = Seq2SeqModelConfig(vocab_size=53, context=14, dim=32, heads=4, encoder_layers=2, decoder_layers=2)
    return Seq2SeqTransformer(cfg).double().eval()


def _gpt_alone(model: GPT, ids: list[int]) -> torch.Tensor:
    """The next-token logits after ids, the whole sequence run at once without a cache."""
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0, -1]


def _seq2seq_alone(model: Seq2SeqTransformer, source: list[int], target: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        kv, mask = model.encode(torch.tensor([source]))
        logits = model.decode(torch.tensor([[BOS, *target]]), kv, mask)[0, -1]
        logits[NEVER] = float("-inf")
    return logits


def _drive(rows, starts: dict, joins: dict[int, int], steps: int, alone, lengths: dict[int, int]) -> int:
    """Run rows through a schedule: sequence s joins at step joins[s] and leaves after lengths[s] tokens;
    every token fed is drawn at random (not the argmax, so a wrong row shows). Checks every logit row
    against `alone(prompt, fed)` and returns the number of logit rows checked."""
    rng = random.Random(0)
    live: list[int] = []  # sequence id per row
    fed: dict[int, list[int]] = {}
    pending: dict[int, torch.Tensor] = {}
    checked = 0
    for step in range(steps):
        for s, at in joins.items():
            if at == step:
                pending[s] = rows.add(starts[s])
                live.append(s)
                fed[s] = []
        for s in live:  # every live row's latest logits against the sequence alone
            torch.testing.assert_close(pending[s], alone(starts[s], fed[s]), rtol=1e-9, atol=1e-9)
            checked += 1
        for r in reversed(range(len(live))):
            if len(fed[live[r]]) >= lengths[live[r]]:
                rows.remove(r)
                live[r] = live[-1]
                live.pop()
        if not live:
            continue
        tokens = [rng.randrange(3, 50) for _ in live]
        for s, t in zip(live, tokens, strict=True):
            fed[s].append(t)
        logits = rows.step(torch.tensor(tokens))
        assert logits.shape[0] == len(live)
        for r, s in enumerate(live):
            pending[s] = logits[r]
    return checked


def test_gpt_rows_match_each_sequence_alone_as_rows_join_and_leave():
    model = _gpt()
    starts = {0: [1, 2, 3], 1: [5], 2: [7, 8, 9, 10, 11, 12], 3: [4, 4], 4: [9, 8, 7, 6, 5, 4, 3, 2, 1, 9]}
    joins = {0: 0, 1: 0, 2: 3, 3: 4, 4: 9}  # 3 slots: sequence 3 joins after 1 leaves, 4 after 0
    lengths = {0: 8, 1: 3, 2: 10, 3: 6, 4: 9}
    rows = GPTRows(model, slots=3)
    checked = _drive(rows, starts, joins, 25, lambda p, f: _gpt_alone(model, p + f), lengths)
    assert checked == sum(lengths.values()) + len(lengths)
    assert rows.rows == 0


def test_a_prompt_read_in_chunks_between_steps_is_the_prompt_read_at_once():
    """Chunked prefill: a long prompt read 3 tokens a pass, the live rows stepping between the passes;
    it becomes a row only after its last pass, with the logits of the whole prompt, and the live rows
    are those they would be without it."""
    model = _gpt()
    rows = GPTRows(model, slots=3)
    first = [1, 2, 3]
    rows.add(first)
    prompt = [9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8]
    reader = rows.reader(prompt)
    fed = []
    for _ in range(3):  # three passes of three tokens, each followed by a step of the live row
        assert reader.read(3) is None and rows.rows == 1
        fed.append(5 + len(fed))
        alone = _gpt_alone(model, first + fed)
        torch.testing.assert_close(rows.step([fed[-1]])[0], alone, rtol=1e-9, atol=1e-9)
    assert reader.unread == 2
    logits = reader.read(3)  # the last two tokens: the row joins
    assert rows.rows == 2 and reader.unread == 0
    torch.testing.assert_close(logits, _gpt_alone(model, prompt), rtol=1e-9, atol=1e-9)
    both = rows.step([11, 12])
    torch.testing.assert_close(both[0], _gpt_alone(model, [*first, *fed, 11]), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(both[1], _gpt_alone(model, [*prompt, 12]), rtol=1e-9, atol=1e-9)
    with pytest.raises(RuntimeError, match="has been read"):
        reader.read(1)
    seq2seq = Seq2SeqRows(_seq2seq(), slots=1, source_length=10)  # a source: encoded in one pass
    source = seq2seq.reader([5, 6, 2])
    assert source.read(1) is not None and seq2seq.rows == 1 and source.unread == 0


def test_seq2seq_rows_match_each_source_alone_with_sources_of_different_lengths():
    model = _seq2seq()
    starts = {0: [5, 6, 7, 2], 1: [9, 2], 2: [3, 4, 5, 6, 7, 8, 9, 10, 2], 3: [11, 12, 2]}
    joins = {0: 0, 1: 0, 2: 2, 3: 5}
    lengths = {0: 6, 1: 2, 2: 9, 3: 4}
    rows = Seq2SeqRows(model, slots=3, source_length=10)
    checked = _drive(rows, starts, joins, 20, lambda s, f: _seq2seq_alone(model, s, f), lengths)
    assert checked == sum(lengths.values()) + len(lengths)
    logits = Seq2SeqRows(model, slots=1, source_length=10).add(starts[0])
    assert logits[PAD] == float("-inf") and logits[BOS] == float("-inf") and torch.isfinite(logits[3:]).all()


def test_rows_know_when_a_sequence_fills_the_context_and_refuse_too_long_prompts():
    model = _gpt()
    rows = GPTRows(model, slots=2)
    rows.add(list(range(1, 19)))  # 18 of 20 positions
    assert not rows.full(0)
    rows.step(torch.tensor([3]))
    assert not rows.full(0)
    rows.step(torch.tensor([3]))
    assert rows.full(0)
    with pytest.raises(ValueError, match="1 to 20 tokens"):
        rows.add(list(range(21)))
    with pytest.raises(ValueError, match="1 to 20 tokens"):
        rows.add([])
    rows.add([1])
    with pytest.raises(RuntimeError, match="rows is taken"):
        rows.add([2])


def test_slot_cache_grows_its_rows_on_demand_and_keeps_what_they_hold():
    like = torch.zeros(1)
    slots = SlotKVCache(layers=1, slots=9, heads=1, length=5, head_dim=2, like=like)
    assert slots.k[0].shape[0] == 4  # starts small
    for i in range(9):
        from largo.models.layers import KVCache

        one = KVCache(1, 1, 1, 5, 2, like)
        one.update(0, torch.full((1, 1, 2, 2), float(i)), torch.full((1, 1, 2, 2), -float(i)))
        one.advance(2)
        assert slots.put(one) == i
    assert slots.k[0].shape[0] == 9
    assert [float(slots.k[0][i, 0, 1, 0]) for i in range(9)] == [float(i) for i in range(9)]
    slots.remove(2)  # the last row (8) moves into row 2
    assert slots.rows == 8 and float(slots.k[0][2, 0, 0, 0]) == 8.0 and float(slots.v[0][2, 0, 1, 1]) == -8.0


def test_rows_grown_past_their_first_allocation_still_leave_and_match():
    """Rows past the first 4 are allocated inside inference mode; removing one afterwards (from plain code)
    must work, and the row moved into its place keeps its sequence."""
    model = _gpt()
    rows = GPTRows(model, slots=6)
    prompts = [[i + 1] * (i + 2) for i in range(6)]
    for p in prompts:
        rows.add(p)
    rows.remove(0)  # the last row (prompt 5) moves into row 0
    logits = rows.step(torch.tensor([7, 8, 9, 10, 11]))
    torch.testing.assert_close(logits[0], _gpt_alone(model, prompts[5] + [7]), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits[1], _gpt_alone(model, prompts[1] + [8]), rtol=1e-9, atol=1e-9)


def test_sample_rows_draws_for_each_row_what_sample_next_draws_for_it_alone():
    from largo.models.layers import sample_next, sample_rows

    torch.manual_seed(1)
    logits = torch.randn(5, 40) * 3
    logits[4, :2] = float("-inf")  # a seq2seq row: PAD and BOS never drawn
    settings = [(0.8, 50, None), (1.5, 3, None), (1.0, None, 0.5), (0.7, 10, 0.9), (2.0, None, None)]
    alone = [torch.Generator().manual_seed(10 + i) for i in range(5)]
    batched = [torch.Generator().manual_seed(10 + i) for i in range(5)]
    draws = []
    for _ in range(200):
        one = [
            int(sample_next(logits[i : i + 1], t, k, p, alone[i])[0]) for i, (t, k, p) in enumerate(settings)
        ]
        together = sample_rows(
            logits,
            torch.tensor([t for t, _, _ in settings]),
            torch.tensor([k or 0 for _, k, _ in settings]),
            torch.tensor([1.0 if p is None else p for _, _, p in settings]),
            torch.cat([torch.rand(1, generator=g) for g in batched]),
        ).tolist()
        assert one == together
        draws.append(together)
    columns = list(zip(*draws, strict=True))
    assert set(columns[1]) <= set(logits[1].topk(3).indices.tolist())  # top-k 3
    probs = logits[2].softmax(-1).sort(descending=True)
    nucleus = probs.indices[: int((probs.values.cumsum(0) < 0.5).sum()) + 1].tolist()
    assert set(columns[2]) <= set(nucleus)  # top-p 0.5: the smallest prefix holding half the mass
    assert not {0, 1} & set(columns[4]) and len(set(columns[4])) > 10  # temperature 2 spreads widely


def test_a_failed_read_leaves_the_rows_as_they_were(monkeypatch: pytest.MonkeyPatch):
    """A seq2seq source whose decoder cache cannot be stored (say, out of memory) must not leave the
    cross-attention memory a row ahead; a cache that cannot grow keeps what its rows hold."""
    model = _seq2seq()
    rows = Seq2SeqRows(model, slots=3, source_length=10)
    rows.add([5, 6, 2])

    def no_room(cache):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(rows.cache, "put", no_room)
    with pytest.raises(RuntimeError, match="out of memory"):
        rows.add([7, 2])
    monkeypatch.undo()
    assert rows.rows == rows.memory.rows == 1
    rows.add([9, 9, 2])
    logits = rows.step(torch.tensor([4, 5]))
    torch.testing.assert_close(logits[1], _seq2seq_alone(model, [9, 9, 2], [5]), rtol=1e-9, atol=1e-9)

    slots = SlotKVCache(layers=1, slots=8, heads=1, length=3, head_dim=2, like=torch.zeros(1))
    slots.k[0].fill_(1.0)
    calls = []
    real_zeros = torch.zeros

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", fails_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        slots._allocate(8)
    monkeypatch.undo()
    assert slots.k[0].shape[0] == slots.v[0].shape[0] == 4 and bool((slots.k[0] == 1.0).all())


def test_sample_rows_refuses_broken_logits_and_a_tiny_temperature_is_greedy():
    from largo.models.layers import sample_rows

    logits = torch.tensor([[0.0, 4.0, 5.0, -1.0], [1.0, float("nan"), 0.0, 0.0]])
    settings = (torch.tensor([1e-38, 1.0]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="no finite largest value"):
        sample_rows(logits, *settings, torch.tensor([0.99, 0.5]))
    for u in (0.0, 0.5, 0.999):
        assert (
            int(sample_rows(logits[:1], settings[0][:1], settings[1][:1], settings[2][:1], torch.tensor([u])))
            == 2
        )
