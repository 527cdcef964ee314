"""Writes the fuzz targets' fixed inputs (fuzz/fixtures) and seed corpora (fuzz/corpus/*/seed-*).

Standard library only, deterministic (fixed random seed), so the committed files can be
regenerated and reviewed: `python3 fuzz/make_seeds.py`.

The seeds are small on purpose: a fuzzer mutates every byte of its inputs, so a 400 KB model
spends most executions on tensor data. The micro models here are real, loadable models (the
loader accepts them) that cover each GGUF quantization type and both tokenizer kinds, in a
few KB each.
"""
import hashlib
import io
import json
import random
import struct
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = ROOT / "tests" / "fixtures"
rng = random.Random(24)

# ---------------------------------------------------------------------------------------------
# safetensors: a micro Llama (vocab 16, hidden 8, 2 heads of 4, 1 KV head, 1 layer, tied)

MICRO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "eos_token_id": 2,
    "bos_token_id": 1,
}


def micro_tensors():
    h, q, kv, inter, v = 8, 8, 4, 16, 16
    p = "model.layers.0"
    shapes = [
        ("model.embed_tokens.weight", [v, h], "F32"),
        (f"{p}.input_layernorm.weight", [h], "F32"),
        (f"{p}.self_attn.q_proj.weight", [q, h], "F16"),
        (f"{p}.self_attn.k_proj.weight", [kv, h], "BF16"),
        (f"{p}.self_attn.v_proj.weight", [kv, h], "F32"),
        (f"{p}.self_attn.o_proj.weight", [h, q], "F16"),
        (f"{p}.post_attention_layernorm.weight", [h], "F32"),
        (f"{p}.mlp.gate_proj.weight", [inter, h], "BF16"),
        (f"{p}.mlp.up_proj.weight", [inter, h], "F32"),
        (f"{p}.mlp.down_proj.weight", [h, inter], "F16"),
        ("model.norm.weight", [h], "F32"),
    ]
    out = []
    for name, shape, dtype in shapes:
        n = 1
        for d in shape:
            n *= d
        vals = [rng.uniform(-0.5, 0.5) for _ in range(n)]
        if dtype == "F32":
            data = struct.pack(f"<{n}f", *vals)
        elif dtype == "F16":
            data = struct.pack(f"<{n}e", *vals)
        else:  # BF16: the high half of the f32 bits
            data = b"".join(struct.pack("<f", x)[2:] for x in vals)
        out.append((name, shape, dtype, data))
    return out


def safetensors_bytes(tensors):
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, shape, dtype, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def header_only(path: Path) -> bytes:
    """A real checkpoint's header with its data cut off: the header parser's seed."""
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return b[: 8 + n]


# ---------------------------------------------------------------------------------------------
# GGUF: micro models, one per tokenizer kind, every quantization type the loader reads

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
# (elements per block, bytes per block, byte offsets of the f16 scales in a block)
BLOCKS = {
    Q4_0: (32, 18, [0]),
    Q4_1: (32, 20, [0, 2]),
    Q5_0: (32, 22, [0]),
    Q5_1: (32, 24, [0, 2]),
    Q8_0: (32, 34, [0]),
    Q4_K: (256, 144, [0, 2]),
    Q5_K: (256, 176, [0, 2]),
    Q6_K: (256, 210, [208]),
}
U8, I8, U16, I16, U32, I32, F32T, BOOL, STR, ARR, U64, I64, F64 = range(13)


def gstr(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gval(ty: int, v) -> bytes:
    if ty == STR:
        return gstr(v)
    if ty == ARR:
        ety, items = v
        return struct.pack("<IQ", ety, len(items)) + b"".join(gval(ety, x) for x in items)
    fmt = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32T: "f", BOOL: "?",
           U64: "Q", I64: "q", F64: "d"}[ty]
    return struct.pack("<" + fmt, v)


def tensor_data(ggml_type: int, rows: int, cols: int) -> bytes:
    n = rows * cols
    if ggml_type == F32:
        return struct.pack(f"<{n}f", *(rng.uniform(-0.5, 0.5) for _ in range(n)))
    if ggml_type == F16:
        return struct.pack(f"<{n}e", *(rng.uniform(-0.5, 0.5) for _ in range(n)))
    if ggml_type == BF16:
        return b"".join(struct.pack("<f", rng.uniform(-0.5, 0.5))[2:] for _ in range(n))
    per, size, scales = BLOCKS[ggml_type]
    assert cols % per == 0, (ggml_type, cols)
    out = bytearray()
    for _ in range(n // per):
        block = bytearray(rng.getrandbits(8) for _ in range(size))
        for s in scales:  # finite, small scales: random f16 bits are often NaN/inf
            block[s:s + 2] = struct.pack("<e", rng.uniform(0.001, 0.02))
        out += block
    return bytes(out)


def gguf_bytes(metadata, tensors, version=3, alignment=32) -> bytes:
    """metadata: [(key, type, value)]; tensors: [(name, hf_shape [rows, cols] or [n], type)]."""
    kv = b"".join(gstr(k) + struct.pack("<I", t) + gval(t, v) for k, t, v in metadata)
    infos, datas, off = b"", [], 0
    for name, shape, ty in tensors:
        rows, cols = (1, shape[0]) if len(shape) == 1 else shape
        data = tensor_data(ty, rows, cols)
        dims = list(reversed(shape))  # ggml order: the row length first
        infos += gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", ty, off)
        pad = -len(data) % alignment
        datas.append(data + b"\0" * pad)
        off += len(data) + pad
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata)) + kv + infos
    head += b"\0" * (-len(head) % alignment)
    return head + b"".join(datas)


def arch_metadata(arch: str, hidden, layers, inter, heads, kv_heads, head_dim):
    return [
        ("general.architecture", STR, arch),
        ("general.name", STR, f"micro-{arch}"),
        (f"{arch}.context_length", U32, 64),
        (f"{arch}.embedding_length", U32, hidden),
        (f"{arch}.block_count", U32, layers),
        (f"{arch}.feed_forward_length", U32, inter),
        (f"{arch}.attention.head_count", U32, heads),
        (f"{arch}.attention.head_count_kv", U32, kv_heads),
        (f"{arch}.attention.key_length", U32, head_dim),
        (f"{arch}.attention.value_length", U32, head_dim),
        (f"{arch}.attention.layer_norm_rms_epsilon", F32T, 1e-6),
        (f"{arch}.rope.freq_base", F32T, 10000.0),
    ]


def model_tensors(vocab, hidden, q, kv, inter, types, bias=False, tied=True):
    t = [("token_embd.weight", [vocab, hidden], types["embd"]),
         ("output_norm.weight", [hidden], F32)]
    if not tied:
        t.append(("output.weight", [vocab, hidden], types["embd"]))
    b = "blk.0"
    t += [(f"{b}.attn_norm.weight", [hidden], F32),
          (f"{b}.attn_q.weight", [q, hidden], types["q"]),
          (f"{b}.attn_k.weight", [kv, hidden], types["k"]),
          (f"{b}.attn_v.weight", [kv, hidden], types["v"]),
          (f"{b}.attn_output.weight", [hidden, q], types["o"]),
          (f"{b}.ffn_norm.weight", [hidden], F32),
          (f"{b}.ffn_gate.weight", [inter, hidden], types["gate"]),
          (f"{b}.ffn_up.weight", [inter, hidden], types["up"]),
          (f"{b}.ffn_down.weight", [hidden, inter], types["down"])]
    if bias:
        t += [(f"{b}.attn_q.bias", [q], F32), (f"{b}.attn_k.bias", [kv], F32),
              (f"{b}.attn_v.bias", [kv], F32)]
    return t


def spm_tokenizer():
    # Byte-fallback pieces for a few bytes only: enough to exercise the byte path.
    pieces = ["\u2581", "\u2581t", "he", "\u2581the", "a", "t", "\u2581c", "at", "\u2581cat"]
    byte_tokens = [f"<0x{b:02X}>" for b in (0x0A, 0x20, 0xC3, 0xA9, 0xE6, 0x97, 0xA5)]
    tokens = ["<unk>", "<s>", "</s>"] + byte_tokens + pieces
    types = [2, 3, 3] + [6] * len(byte_tokens) + [1] * len(pieces)
    scores = [0.0] * (3 + len(byte_tokens)) + [-float(i) for i in range(len(pieces))]
    return tokens, [
        ("tokenizer.ggml.model", STR, "llama"),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.scores", ARR, (F32T, scores)),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.unknown_token_id", U32, 0),
        ("tokenizer.ggml.add_bos_token", BOOL, True),
        ("tokenizer.chat_template", STR,
         "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"),
    ]


def gpt2_tokenizer():
    # Byte-level BPE: GPT-2's printable stand-ins for the bytes of "the cat", a space (Ġ)
    # and a few merges, plus two special tokens.
    base = ["t", "h", "e", "c", "a", "Ġ", "s"]
    merges = ["t h", "th e", "Ġ c", "a t", "Ġc at"]
    tokens = base + ["th", "the", "Ġc", "at", "Ġcat", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    return tokens, [
        ("tokenizer.ggml.model", STR, "gpt2"),
        ("tokenizer.ggml.pre", STR, "qwen2"),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.merges", ARR, (STR, merges)),
        ("tokenizer.ggml.eos_token_id", U32, len(tokens) - 1),
        ("tokenizer.ggml.padding_token_id", U32, len(tokens) - 3),
        ("tokenizer.chat_template", STR,
         "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    ]


def gguf_seeds():
    hidden, heads, kvh, hd, inter = 32, 4, 2, 8, 256
    q, kv = heads * hd, kvh * hd
    spm_tokens, spm_meta = spm_tokenizer()
    llama = gguf_bytes(
        arch_metadata("llama", hidden, 1, inter, heads, kvh, hd) + spm_meta,
        model_tensors(len(spm_tokens), hidden, q, kv, inter, {
            "embd": Q8_0, "q": Q4_0, "k": Q4_1, "v": Q5_1, "o": BF16,
            "gate": Q5_0, "up": Q4_0, "down": Q6_K}))
    bpe_tokens, bpe_meta = gpt2_tokenizer()
    qwen2 = gguf_bytes(
        arch_metadata("qwen2", hidden, 1, inter, heads, kvh, hd) + bpe_meta,
        model_tensors(len(bpe_tokens), hidden, q, kv, inter, {
            "embd": F16, "q": F16, "k": F32, "v": Q8_0, "o": Q4_0,
            "gate": Q4_1, "up": Q5_0, "down": Q4_K}, bias=True, tied=False))
    # No tokenizer, GGUF v2, a non-default alignment: the vocabulary comes from the embedding.
    bare = gguf_bytes(
        arch_metadata("llama", hidden, 1, inter, heads, kvh, hd)
        + [("general.alignment", U32, 64)],
        model_tensors(24, hidden, q, kv, inter, {
            "embd": F32, "q": F16, "k": Q8_0, "v": Q8_0, "o": Q8_0,
            "gate": Q4_1, "up": Q4_0, "down": Q5_K}),
        version=2, alignment=64)
    return {"micro_llama_spm.gguf": llama, "micro_qwen2_bpe.gguf": qwen2,
            "micro_llama_bare_v2.gguf": bare}


# ---------------------------------------------------------------------------------------------
# install artifacts: tar archives (the target gzips what is not already gzip)

def tar_bytes(entries, gz=False) -> bytes:
    """entries: [(name, bytes | None for a folder | ("link", target))]"""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.GNU_FORMAT) as t:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            elif isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                t.addfile(info)
            else:
                info.size, info.mode = len(content), 0o755
                t.addfile(info, io.BytesIO(content))
    data = buf.getvalue()
    if gz:
        return data
    # tarfile pads to a 10 KiB record; readers stop at the two zero blocks before that.
    end = len(data.rstrip(b"\0"))
    return data[: -(-end // 512) * 512 + 1024]


def manifest(files) -> bytes:
    return json.dumps({
        "schema": 1, "name": "rvllm", "version": "0.1.0", "commit": "0" * 40,
        "target": "x86_64-unknown-linux-gnu", "cuda": None, "compute_capabilities": [],
        "min_glibc": "2.17",
        "files": [{"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest(),
                   "executable": p.startswith("bin/")} for p, b in files],
    }, indent=1).encode()


def unpack_seeds():
    binary = b"\x7fELF" + b"rvllm" * 8
    kernel = b"\x50\xed\x55\xba" + b"\0" * 12
    files = [("bin/rvllm", binary), ("kernels/a.fatbin", kernel)]
    good = [("manifest.json", manifest(files)), ("bin", None), ("bin/rvllm", binary),
            ("kernels", None), ("kernels/a.fatbin", kernel)]
    escape_files = files + [("../evil", b"x")]
    escape = [("manifest.json", manifest(escape_files)), ("bin/rvllm", binary),
              ("kernels/a.fatbin", kernel), ("../evil", b"x")]
    link = good + [("bin/link", ("link", "../../../etc/passwd"))]
    return {"artifact.tar": tar_bytes(good), "artifact.tar.gz": tar_bytes(good, gz=True),
            "escape.tar": tar_bytes(escape), "symlink.tar": tar_bytes(link)}


# ---------------------------------------------------------------------------------------------

REQUESTS = {
    "completion_text.json": {"model": "m", "prompt": "Hello", "max_tokens": 8, "temperature": 0.7,
                             "top_p": 0.9, "stop": ["\n", "."], "seed": 1, "logprobs": 2,
                             "echo": True, "n": 2, "stream": True,
                             "stream_options": {"include_usage": True}},
    "completion_tokens.json": {"prompt": [[1, 2, 3], [4]], "max_tokens": 1, "top_k": 5,
                               "min_p": 0.1, "repetition_penalty": 1.1, "stop_token_ids": [2],
                               "prompt_logprobs": 1, "logit_bias": {"5": -100},
                               "ignore_eos": True, "min_tokens": 1},
    "chat_parts.json": {"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
        {"role": "assistant", "content": "Hel"}],
        "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 3,
        "continue_final_message": True, "add_generation_prompt": False, "stop": "x",
        "frequency_penalty": 0.5, "presence_penalty": -0.5},
    "chat_template.json": {"messages": [{"role": "user", "content": "hi"}],
                           "chat_template": "{{ messages[0].content }}", "stream": False,
                           "response_format": {"type": "text"}},
}


def main():
    corpus, fixtures = HERE / "corpus", HERE / "fixtures"

    def put(target: str, name: str, data: bytes):
        d = corpus / target
        d.mkdir(parents=True, exist_ok=True)
        (d / f"seed-{name}").write_bytes(data)

    fixtures.mkdir(exist_ok=True)
    (fixtures / "config.json").write_text(json.dumps(MICRO_CONFIG, indent=1) + "\n")
    tensors = micro_tensors()
    shards = [tensors[:5], tensors[5:]]
    weight_map = {}
    for i, part in enumerate(shards, 1):
        name = f"model-0000{i}-of-00002.safetensors"
        (fixtures / name).write_bytes(safetensors_bytes(part))
        weight_map.update({t[0]: name for t in part})

    put("safetensors", "micro.safetensors", safetensors_bytes(tensors))
    put("safetensors", "llama3_header.safetensors",
        header_only(FIXTURES / "tiny" / "llama3" / "model.safetensors"))
    put("index", "micro.index.json", json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=1).encode())
    put("index", "mistral_sharded.index.json",
        (FIXTURES / "tiny" / "mistral_sharded" / "model.safetensors.index.json").read_bytes())
    for name, data in gguf_seeds().items():
        put("gguf", name, data)
    # config: config.json, then a NUL and generation_config.json when the folder has one.
    put("config", "micro.json", (fixtures / "config.json").read_bytes())
    for d in sorted((FIXTURES / "tiny").iterdir()):
        data = (d / "config.json").read_bytes()
        gen = d / "generation_config.json"
        if gen.is_file():
            data += b"\0" + gen.read_bytes()
        put("config", f"{d.name}.json", data)
    for name, body in REQUESTS.items():
        put("request", name, json.dumps(body).encode())
    for name, data in unpack_seeds().items():
        put("unpack", name, data)
    for p in sorted(fixtures.iterdir()):
        print(p.relative_to(HERE), p.stat().st_size)
    for p in sorted(corpus.rglob("seed-*")):
        print(p.relative_to(HERE), p.stat().st_size)


if __name__ == "__main__":
    main()
