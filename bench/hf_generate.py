"""An imported Hugging Face causal LM: largo's generation vs transformers' `generate` on the same model.

A random Qwen2-shaped model (grouped-query attention, qkv biases, tied embedding; default dim 512,
8 layers, 8 heads, 2 key/value heads, vocabulary 16,384: ~31M parameters) is saved with transformers
into a temporary folder, read back by `largo.deploy.hf_lm.import_hf_lm`, and both continue the same
64-token prompt greedily for 128 new tokens at batch 1 (end of text ignored, so every variant runs the
same number of steps). Speed does not depend on the weights' values. Variants:

    hf           transformers `generate` (do_sample=False, its KV cache), fp32
    hf-bf16      the same with the weights in bf16
    largo        `TextGenerator.stream_ids` on the imported model, fp32
    largo-bf16   the same, weights and KV cache in bf16 (`precision="bf16"`)
    onnx         with --onnx: the bundle exported by `largo export` and run by ONNX Runtime

The script checks that largo's fp32 tokens equal transformers' (the conversion is exact up to float
rounding) and reports how many bf16 tokens match. Every round runs each variant once in a rotated
order after a warm-up, with `probe.peak_probe` (GFLOP/s of a fixed matmul) beside it; medians of the
per-round ratios to `hf` are printed, so a noisy round does not decide the result.

    .venv/bin/python bench/hf_generate.py               # ~31M parameters, 5 rounds (~3 min)
    .venv/bin/python bench/hf_generate.py --onnx        # with ONNX Runtime (the export adds ~1 min)
    .venv/bin/python bench/hf_generate.py --quick       # smoke test: tiny model, 2 rounds (< 30 s)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tokenizers import pre_tokenizers, trainers

from largo.data.corpus import new_byte_bpe
from largo.deploy.generator import TextGenerator
from largo.deploy.hf_lm import import_hf_lm, write_imported
from probe import peak_probe

SIZES = {
    "full": {"dim": 512, "layers": 8, "heads": 8, "kv_heads": 2, "ff": 1408, "vocab": 16384, "rounds": 5},
    "quick": {"dim": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ff": 128, "vocab": 2048, "rounds": 2},
}
PROMPT, NEW = 64, 128
SENTENCE = "the cat sat on a mat and a dog ran to the park while birds sang 今天 天气 很好 我们 去 公园"
WORDS = tuple(SENTENCE.split())


def make_folder(folder: Path, size: dict) -> None:
    """A random Qwen2 model and a byte-level BPE of at most its vocabulary, saved as transformers does."""
    tok = new_byte_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=size["vocab"],
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + f" {i}" for i in range(20_000)]
    tok.train_from_iterator(text, trainer)
    config = transformers.Qwen2Config(
        vocab_size=size["vocab"],
        hidden_size=size["dim"],
        intermediate_size=size["ff"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=0,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds")
    parser.add_argument("--onnx", action="store_true", help="also time ONNX Runtime on the exported bundle")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    rounds = args.rounds or size["rounds"]
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    print(f"{versions}, threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        make_folder(folder, size)
        t = time.perf_counter()
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        hf_load = time.perf_counter() - t
        t = time.perf_counter()
        bundle = import_hf_lm(folder)
        largo_load = time.perf_counter() - t
        params = bundle.model.num_parameters()
        loads = f"transformers {hf_load:.2f} s, largo import {largo_load:.2f} s"
        print(f"model: {params / 1e6:.1f}M parameters; load: {loads}")
        hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        largo_fp32 = TextGenerator(bundle)
        largo_bf16 = TextGenerator(import_hf_lm(folder), precision="bf16")
        prompt_ids = [4 + (i * 37) % (size["vocab"] // 2) for i in range(PROMPT)]
        prompt_text = bundle.tokenizer.decode(prompt_ids)
        ids = largo_fp32.encode(prompt_text)[:PROMPT]
        prompt_text = bundle.tokenizer.decode(ids)  # a prompt that encodes back to `ids`
        ids = largo_fp32.encode(prompt_text)

        def run_hf(model: torch.nn.Module) -> Callable[[], list[int]]:
            def go() -> list[int]:
                with torch.inference_mode():
                    out = model.generate(
                        torch.tensor([ids]),
                        max_new_tokens=NEW,
                        min_new_tokens=NEW,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=0,
                    )
                return out[0, len(ids) :].tolist()

            return go

        def run_largo(gen: object) -> Callable[[], list[int]]:
            return lambda: list(gen.stream_ids(prompt_text, NEW, temperature=0, stop_at_eot=False))

        variants = {
            "hf": run_hf(hf),
            "hf-bf16": run_hf(hf_bf16),
            "largo": run_largo(largo_fp32),
            "largo-bf16": run_largo(largo_bf16),
        }
        if args.onnx:
            import largo

            out = write_imported(bundle, Path(tmp) / "runs" / "qwen" / "v1")
            corpus = Path(tmp) / "held_out.txt"
            corpus.write_text("\n".join(" ".join(WORDS[j::3]) for j in range(200)), encoding="utf-8")
            t = time.perf_counter()
            largo.export(out, "onnx", data=corpus)
            print(f"onnx export + parity check: {time.perf_counter() - t:.1f} s")
            variants["onnx"] = run_largo(largo.load(out, runtime="onnx"))

        tokens = {name: run() for name, run in variants.items()}  # warm-up, and the outputs compared
        same = tokens["largo"] == tokens["hf"]
        print(f"largo fp32 tokens equal transformers': {same}")
        for name in variants:
            if name not in ("hf", "largo"):
                agree = sum(a == b for a, b in zip(tokens[name], tokens["hf"], strict=True))
                print(f"  {name}: {agree}/{NEW} equal transformers' fp32 tokens (greedy: diverges after one)")

        names = list(variants)
        times: dict[str, list[float]] = {n: [] for n in names}
        probes = []
        for r in range(rounds):
            probes.append(peak_probe())
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t)
        print(f"\n{rounds} rounds, batch 1, {PROMPT}-token prompt, {NEW} new tokens (prefill included)")
        print(f"peak probe GFLOP/s per round: {', '.join(f'{p:.0f}' for p in probes)}")
        print(f"{'variant':<12}{'tok/s':>9}{'vs hf':>9}")
        for name in names:
            ratio = statistics.median(h / x for h, x in zip(times["hf"], times[name], strict=True))
            print(f"{name:<12}{NEW / statistics.median(times[name]):>9.1f}{ratio:>8.2f}x")


if __name__ == "__main__":
    main()
