//! Argument structs of kernels whose parameters are another kernel's plus a few: the compact
//! and windowed decode builds and the FP8-cache ones (decode, prefill, rope-and-cache), which
//! take the plain kernel's parameters and a window, soft-cap or the layer's (k, v) scales. One
//! launch site builds the plain struct and these move it into the build it runs, so the paths
//! cannot pass different arguments. Each literal must name every field of its target, so a
//! parameter added to a kernel fails to compile here until it is passed.

/// `args::$to` from a decode attention argument struct `$a` (the fields of `DecodeAttention`) and
/// the fields the target adds.
macro_rules! decode_args {
    ($a:ident => $to:ident $(, $x:ident: $v:expr)* $(,)?) => {
        args::$to {
            out: $a.out,
            partial_out: $a.partial_out,
            partial_ml: $a.partial_ml,
            semaphores: $a.semaphores,
            q: $a.q,
            k_new: $a.k_new,
            v_new: $a.v_new,
            qkv_stride: $a.qkv_stride,
            key_cache: $a.key_cache,
            value_cache: $a.value_cache,
            block_tables: $a.block_tables,
            context_lens: $a.context_lens,
            positions: $a.positions,
            slot_mapping: $a.slot_mapping,
            inv_freq: $a.inv_freq,
            scale: $a.scale,
            num_heads: $a.num_heads,
            num_kv_heads: $a.num_kv_heads,
            block_size: $a.block_size,
            max_blocks_per_seq: $a.max_blocks_per_seq,
            target_partitions: $a.target_partitions,
            $($x: $v,)*
        }
    };
}

/// `args::$to` from a prefill attention argument struct `$a` (the fields of `PrefillAttention`)
/// and the fields the target adds.
macro_rules! prefill_args {
    ($a:ident => $to:ident $(, $x:ident: $v:expr)* $(,)?) => {
        args::$to {
            out: $a.out,
            q: $a.q,
            key_cache: $a.key_cache,
            value_cache: $a.value_cache,
            cu_seqlens_q: $a.cu_seqlens_q,
            context_lens: $a.context_lens,
            block_tables: $a.block_tables,
            scale: $a.scale,
            num_heads: $a.num_heads,
            num_kv_heads: $a.num_kv_heads,
            block_size: $a.block_size,
            max_blocks_per_seq: $a.max_blocks_per_seq,
            q_stride: $a.q_stride,
            $($x: $v,)*
        }
    };
}

/// `args::$to` from a rope-and-cache argument struct `$a` (the fields of `RopeAndCache`) and the
/// fields the target adds.
macro_rules! rope_args {
    ($a:ident => $to:ident $(, $x:ident: $v:expr)* $(,)?) => {
        args::$to {
            q: $a.q,
            k: $a.k,
            v: $a.v,
            key_cache: $a.key_cache,
            value_cache: $a.value_cache,
            positions: $a.positions,
            slot_mapping: $a.slot_mapping,
            inv_freq: $a.inv_freq,
            num_tokens: $a.num_tokens,
            num_heads: $a.num_heads,
            num_kv_heads: $a.num_kv_heads,
            head_dim: $a.head_dim,
            q_stride: $a.q_stride,
            k_stride: $a.k_stride,
            v_stride: $a.v_stride,
            $($x: $v,)*
        }
    };
}
