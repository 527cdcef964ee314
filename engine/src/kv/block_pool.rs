//! A pool of fixed-size KV cache blocks: reference counts, a free list, and (optionally)
//! the prefix cache's index of full blocks by content.
//!
//! Block ids index the physical KV cache the backend allocates (`num_blocks` blocks of
//! `block_size` token slots per layer). The pool only does bookkeeping: which ids are in
//! use, by how many owners, and which hold a known run of tokens.
use std::collections::{BTreeMap, HashMap};

use super::prefix_cache::BlockKey;

/// Tokens per block unless the user asks otherwise (`--block-size`), as in vLLM.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

#[derive(Debug, Clone)]
pub struct KvBlockPool {
    block_size: usize,
    /// Owners per block; 0 means the block is on the free list.
    ref_counts: Vec<u32>,
    /// Free blocks by the time they were freed. Allocation takes the oldest first, so the
    /// most recently freed block is reused last (LRU): a cached block's contents stay
    /// reusable as long as possible, and use-after-free bugs show up sooner.
    free: BTreeMap<u64, u32>,
    /// Each free block's key in `free` (unused while the block has owners).
    free_stamp: Vec<u64>,
    next_stamp: u64,
    /// Full blocks whose contents are known, by content hash. A cached block stays here
    /// while it is free, until it is allocated for something else.
    cached: HashMap<u64, u32>,
    block_key: Vec<Option<BlockKey>>,
}

impl KvBlockPool {
    /// A pool of `num_blocks` free blocks of `block_size` tokens (a block size of 0 is
    /// treated as 1 so that the arithmetic below never divides by zero).
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let num_blocks = num_blocks.min(u32::MAX as usize);
        Self {
            block_size: block_size.max(1),
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as u32).map(|b| (b as u64, b)).collect(),
            free_stamp: (0..num_blocks as u64).collect(),
            next_stamp: num_blocks as u64,
            cached: HashMap::new(),
            block_key: vec![None; num_blocks],
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks without owners (cached ones included: they are reclaimed on demand).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Blocks whose contents the prefix cache can reuse.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Fraction of blocks in use, in [0, 1] (0 for an empty pool).
    pub fn usage(&self) -> f32 {
        if self.num_blocks() == 0 {
            return 0.0;
        }
        self.num_used() as f32 / self.num_blocks() as f32
    }

    /// Blocks needed to hold `num_tokens` token slots.
    pub fn blocks_for_tokens(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Take `n` free blocks, each with one owner. All or nothing: `None` (and no change)
    /// when fewer than `n` are free. A cached block taken here loses its cache entry.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, b) = self.free.pop_first()?;
            debug_assert_eq!(
                self.ref_counts[b as usize], 0,
                "block {b} on the free list is in use"
            );
            self.ref_counts[b as usize] = 1;
            self.evict(b);
            blocks.push(b);
        }
        Some(blocks)
    }

    /// Add an owner to an allocated block (a shared prefix or a forked sequence).
    /// Returns false, changing nothing, when the block is not allocated.
    pub fn add_ref(&mut self, block: u32) -> bool {
        match self.ref_counts.get_mut(block as usize) {
            Some(rc) if *rc > 0 => {
                *rc += 1;
                true
            }
            _ => false,
        }
    }

    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts.get(block as usize).copied().unwrap_or(0)
    }

    /// Drop one owner of each block; blocks left with no owner go back on the free list
    /// (keeping their cache entries). Blocks are released last-first, so that a table's
    /// tail (the least shareable part) is reused before its head. Freeing an unallocated or
    /// unknown block is a bookkeeping bug: it is caught in debug builds and ignored in
    /// release ones (never a double entry on the free list).
    pub fn free(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            match self.ref_counts.get_mut(b as usize) {
                Some(rc) if *rc > 0 => {
                    *rc -= 1;
                    if *rc == 0 {
                        let stamp = self.next_stamp;
                        self.next_stamp += 1;
                        self.free.insert(stamp, b);
                        self.free_stamp[b as usize] = stamp;
                    }
                }
                _ => debug_assert!(false, "freeing block {b}, which is not allocated"),
            }
        }
    }

    /// The cached block holding exactly `key`'s tokens after `key`'s prefix, if any.
    pub fn lookup(&self, key: &BlockKey) -> Option<u32> {
        let &b = self.cached.get(&key.hash)?;
        // The hash picks the candidate; the stored key makes a collision harmless.
        (self.block_key[b as usize].as_ref() == Some(key)).then_some(b)
    }

    /// Take an owner's share of a cached block found by `lookup`, taking it off the free
    /// list when nobody owned it.
    pub fn acquire_cached(&mut self, block: u32) {
        let Some(rc) = self.ref_counts.get_mut(block as usize) else {
            return;
        };
        if *rc == 0 {
            self.free.remove(&self.free_stamp[block as usize]);
        }
        *rc += 1;
    }

    /// Record that an allocated, fully computed block holds `key`'s tokens. When another
    /// block already holds the same contents, that one stays the cached copy.
    pub fn register(&mut self, block: u32, key: BlockKey) {
        if self.ref_count(block) == 0 || self.block_key[block as usize].is_some() {
            return;
        }
        if self.cached.contains_key(&key.hash) {
            return;
        }
        self.cached.insert(key.hash, block);
        self.block_key[block as usize] = Some(key);
    }

    /// Forget a block's contents (it is about to be overwritten).
    fn evict(&mut self, block: u32) {
        if let Some(key) = self.block_key[block as usize].take() {
            if self.cached.get(&key.hash) == Some(&block) {
                self.cached.remove(&key.hash);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut pool = KvBlockPool::new(4, DEFAULT_BLOCK_SIZE);
        assert_eq!(pool.num_free(), 4);
        let a = pool.allocate(3).expect("3 of 4 blocks are free");
        assert_eq!(a.len(), 3);
        assert_eq!(pool.num_free(), 1);
        assert!(pool.allocate(2).is_none());
        assert_eq!(pool.num_free(), 1, "a failed allocation takes nothing");
        assert_eq!(pool.allocate(1).map(|v| v.len()), Some(1));
        assert_eq!(pool.num_free(), 0);
        assert_eq!(pool.usage(), 1.0);
        assert_eq!(pool.allocate(0), Some(vec![]));
    }

    #[test]
    fn blocks_are_distinct_and_return_on_free() {
        let mut pool = KvBlockPool::new(8, 16);
        let mut a = pool.allocate(5).unwrap();
        let b = pool.allocate(3).unwrap();
        a.extend(&b);
        a.sort();
        a.dedup();
        assert_eq!(a.len(), 8, "no block handed out twice");
        pool.free(&b);
        assert_eq!(pool.num_free(), 3);
        assert!((pool.usage() - 5.0 / 8.0).abs() < 1e-6);
    }

    #[test]
    fn recently_freed_blocks_are_reused_last() {
        let mut pool = KvBlockPool::new(4, 16);
        let first = pool.allocate(2).unwrap(); // [0, 1]; free list now [2, 3]
        pool.free(&first); // free list [2, 3, 1, 0]
        let next = pool.allocate(2).unwrap();
        assert_eq!(
            next,
            vec![2, 3],
            "never-used blocks come before just-freed ones"
        );
        let last = pool.allocate(2).unwrap();
        assert_eq!(
            last,
            vec![1, 0],
            "the table's tail is freed (and reused) first"
        );
    }

    #[test]
    fn ref_counts_keep_shared_blocks_alive() {
        let mut pool = KvBlockPool::new(2, 16);
        let a = pool.allocate(1).unwrap();
        assert!(pool.add_ref(a[0]));
        assert_eq!(pool.ref_count(a[0]), 2);
        pool.free(&a);
        assert_eq!(pool.num_free(), 1, "still owned once");
        pool.free(&a);
        assert_eq!(pool.num_free(), 2);
        assert!(!pool.add_ref(a[0]), "a free block cannot gain an owner");
        assert!(!pool.add_ref(99));
    }

    #[test]
    fn cached_blocks_are_found_reused_and_evicted_last() {
        let mut pool = KvBlockPool::new(3, 2);
        let a = pool.allocate(1).unwrap()[0];
        let key = BlockKey::new(None, &[5, 6]);
        assert_eq!(pool.lookup(&key), None);
        pool.register(a, key.clone());
        assert_eq!(pool.lookup(&key), Some(a));
        assert_eq!(pool.lookup(&BlockKey::new(None, &[5, 7])), None);
        pool.free(&[a]);
        assert_eq!(
            (pool.num_free(), pool.num_cached()),
            (3, 1),
            "free but still cached"
        );

        // A second owner takes it straight off the free list.
        pool.acquire_cached(a);
        assert_eq!((pool.ref_count(a), pool.num_free()), (1, 2));
        pool.acquire_cached(a);
        assert_eq!(pool.ref_count(a), 2);
        pool.free(&[a, a]);

        // Allocation prefers never-cached and older blocks; the cached one goes last.
        let others = pool.allocate(2).unwrap();
        assert!(!others.contains(&a));
        assert_eq!(pool.lookup(&key), Some(a));
        assert_eq!(pool.allocate(1), Some(vec![a]));
        assert_eq!(
            pool.lookup(&key),
            None,
            "reallocating a block evicts its contents"
        );
        assert_eq!(pool.num_cached(), 0);
    }

    #[test]
    fn a_duplicate_block_does_not_replace_the_cached_copy() {
        let mut pool = KvBlockPool::new(2, 2);
        let blocks = pool.allocate(2).unwrap();
        let key = BlockKey::new(None, &[1, 2]);
        pool.register(blocks[0], key.clone());
        pool.register(blocks[1], key.clone());
        assert_eq!(pool.lookup(&key), Some(blocks[0]));
        pool.free(&blocks);
        // Reusing the duplicate leaves the cached copy alone.
        let b = pool.allocate(1).unwrap()[0];
        assert_eq!(b, blocks[1], "freed last-first");
        assert_eq!(pool.lookup(&key), Some(blocks[0]));
    }

    #[test]
    fn blocks_for_tokens_rounds_up() {
        let pool = KvBlockPool::new(1, 16);
        assert_eq!(pool.blocks_for_tokens(0), 0);
        assert_eq!(pool.blocks_for_tokens(1), 1);
        assert_eq!(pool.blocks_for_tokens(16), 1);
        assert_eq!(pool.blocks_for_tokens(17), 2);
        assert_eq!(KvBlockPool::new(0, 0).usage(), 0.0);
    }
}
