//! Content keys for full KV blocks, for the prefix cache.
//!
//! A block's KV entries depend on its own tokens and on every token before it, so a block
//! is identified by a hash chained through its predecessors: `hash(parent_hash, tokens)`.
//! The key keeps the parent hash and the tokens too, so that a hash collision is detected
//! by comparison instead of silently reusing the wrong KV.

/// What a full block holds: its tokens, after the prefix whose last block hashed to `parent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockKey {
    pub hash: u64,
    /// None for a sequence's first block.
    pub parent: Option<u64>,
    pub tokens: Box<[u32]>,
}

impl BlockKey {
    pub fn new(parent: Option<u64>, tokens: &[u32]) -> Self {
        let mut h = crate::hash::splitmix64(
            parent.map_or(0x005E_ED0F_B10C_u64, |p| p ^ 0xA5A5_A5A5_A5A5_A5A5),
        );
        for &t in tokens {
            h = crate::hash::splitmix64(h ^ t as u64);
        }
        h = crate::hash::splitmix64(h ^ tokens.len() as u64);
        Self {
            hash: h,
            parent,
            tokens: tokens.into(),
        }
    }
}

/// The keys of the first `num_blocks` full blocks of `tokens`, each chained on the last.
pub fn block_keys(
    tokens: &[u32],
    block_size: usize,
    num_blocks: usize,
) -> impl Iterator<Item = BlockKey> + '_ {
    let mut parent = None;
    tokens
        .chunks_exact(block_size.max(1))
        .take(num_blocks)
        .map(move |chunk| {
            let key = BlockKey::new(parent, chunk);
            parent = Some(key.hash);
            key
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_tokens_and_the_whole_prefix() {
        let a: Vec<_> = block_keys(&[1, 2, 3, 4, 5], 2, 10).collect();
        assert_eq!(a.len(), 2, "only full blocks");
        assert_eq!(a[0].parent, None);
        assert_eq!(a[1].parent, Some(a[0].hash));
        let b: Vec<_> = block_keys(&[1, 2, 3, 4], 2, 10).collect();
        assert_eq!(a, b);
        let c: Vec<_> = block_keys(&[9, 2, 3, 4], 2, 10).collect();
        assert_ne!(a[1], c[1], "same tokens after a different prefix");
        assert_ne!(a[1].hash, c[1].hash);
        assert_ne!(
            BlockKey::new(None, &[1, 2]).hash,
            BlockKey::new(None, &[2, 1]).hash
        );
        assert_eq!(block_keys(&[1, 2, 3, 4], 2, 1).count(), 1);
    }
}
