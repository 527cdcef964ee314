#!/usr/bin/env python3
"""Gives a config-only model folder (dummy weights, no tokenizer) a synthetic tokenizer.

Usage: make_bench_tokenizer.py SRC_DIR DST_DIR

Copies SRC_DIR's files into DST_DIR and writes there a byte-level BPE tokenizer.json of
exactly config.json's vocab_size tokens, with a tokenizer_config.json. Structured output
needs a tokenizer whose vocabulary matches the model's logits (llguidance masks every id),
and the benchmark's Llama-3.1-8B shape ships none. The vocabulary: the config's bos / eos
/ pad ids as special tokens, then the 256 byte tokens (GPT-2's byte-to-character map), then
lowercase-letter strings by length ("aa", "ab", ... "aaa", ...) until every id is taken.
Each merge is (s[:-1], s[-1]): both halves are earlier tokens, so every merge is valid.
Standard library only: the GPU machine has Python and no network.
"""
import itertools
import json
import shutil
import string
import sys
from pathlib import Path


def bytes_to_unicode():
    """GPT-2's map of the 256 bytes to printable characters (what ByteLevel BPE stores)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def ids_of(value):
    """A config's token id field: an int, a list of ints, or null."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    raise SystemExit(f"unexpected token id field {value!r} in config.json")


def special_tokens(config, vocab_size):
    """(id, name) of the config's bos, eos and pad ids, each once."""
    named = {}
    for field, name in [("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "pad")]:
        for k, tid in enumerate(ids_of(config.get(field))):
            if not 0 <= tid < vocab_size:
                raise SystemExit(f"{field} {tid} is outside the vocabulary ({vocab_size})")
            named.setdefault(tid, f"<|{name}|>" if k == 0 else f"<|{name}_{k}|>")
    return sorted(named.items())


def letter_strings():
    for n in itertools.count(2):
        for t in itertools.product(string.ascii_lowercase, repeat=n):
            yield "".join(t)


def build(config):
    vocab_size = config.get("vocab_size")
    if not isinstance(vocab_size, int):
        raise SystemExit("config.json has no integer vocab_size")
    specials = special_tokens(config, vocab_size)
    special_ids = {tid for tid, _ in specials}
    if vocab_size - len(special_ids) < 256:
        raise SystemExit(f"vocab_size {vocab_size} leaves no room for the 256 byte tokens")
    free_ids = (i for i in range(vocab_size) if i not in special_ids)
    # The specials sit in the model's vocabulary too (as GPT-2's <|endoftext|> does), so
    # that its ids have no holes, which the tokenizers library warns about on every load.
    vocab = {name: tid for tid, name in specials}
    for b, ch in bytes_to_unicode().items():
        vocab[ch] = next(free_ids)
    merges = []
    strings = letter_strings()
    for tid in free_ids:
        s = next(strings)
        vocab[s] = tid
        merges.append(f"{s[:-1]} {s[-1]}")
    assert len(vocab) == vocab_size and sorted(vocab.values()) == list(range(vocab_size))
    added = [
        {
            "id": tid,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for tid, name in specials
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    names = dict(specials)
    first = lambda field: next(iter(ids_of(config.get(field))), None)  # noqa: E731
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": names.get(first("bos_token_id")),
        "eos_token": names.get(first("eos_token_id")),
        "pad_token": names.get(first("pad_token_id")),
        "model_max_length": config.get("max_position_embeddings", 2048),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    return tokenizer, tokenizer_config


def main(argv):
    if len(argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[2])
    src, dst = Path(argv[1]), Path(argv[2])
    config_path = src / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"{config_path} does not exist")
    config = json.loads(config_path.read_text())
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(f, dst / f.name)
    tokenizer, tokenizer_config = build(config)
    (dst / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    merged = len(tokenizer["model"]["merges"])
    print(
        f"{dst}: tokenizer.json of {config['vocab_size']} tokens "
        f"({len(tokenizer['added_tokens'])} special, 256 bytes, {merged} merged)"
    )


if __name__ == "__main__":
    main(sys.argv)
