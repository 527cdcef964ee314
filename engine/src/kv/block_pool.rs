//! A pool of fixed-size KV cache blocks: reference counts and a free list.
//!
//! Block ids index the physical KV cache the backend allocates (`num_blocks` blocks of
//! `block_size` token slots per layer). The pool only does bookkeeping: which ids are in
//! use and by how many owners.
use std::collections::VecDeque;

/// Tokens per block unless the user asks otherwise (`--block-size`), as in vLLM.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

#[derive(Debug, Clone)]
pub struct KvBlockPool {
    block_size: usize,
    /// Owners per block; 0 means the block is on the free list.
    ref_counts: Vec<u32>,
    /// Free block ids. Allocation takes from the front, freeing pushes to the back, so the
    /// most recently freed block is reused last (LRU): its contents stay valid longest,
    /// which is what a prefix cache would want, and use-after-free bugs show up sooner.
    free: VecDeque<u32>,
}

impl KvBlockPool {
    /// A pool of `num_blocks` free blocks of `block_size` tokens (a block size of 0 is
    /// treated as 1 so that the arithmetic below never divides by zero).
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let num_blocks = num_blocks.min(u32::MAX as usize);
        Self {
            block_size: block_size.max(1),
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as u32).collect(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
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
    /// when fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let blocks: Vec<u32> = self.free.drain(..n).collect();
        for &b in &blocks {
            debug_assert_eq!(
                self.ref_counts[b as usize], 0,
                "block {b} on the free list is in use"
            );
            self.ref_counts[b as usize] = 1;
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

    /// Drop one owner of each block; blocks left with no owner go back on the free list.
    /// Blocks are released last-first, so that a table's tail (the least shareable part)
    /// is reused before its head. Freeing an unallocated or unknown block is a bookkeeping
    /// bug: it is caught in debug builds and ignored in release ones (never a double entry
    /// on the free list).
    pub fn free(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            match self.ref_counts.get_mut(b as usize) {
                Some(rc) if *rc > 0 => {
                    *rc -= 1;
                    if *rc == 0 {
                        self.free.push_back(b);
                    }
                }
                _ => debug_assert!(false, "freeing block {b}, which is not allocated"),
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
    fn blocks_for_tokens_rounds_up() {
        let pool = KvBlockPool::new(1, 16);
        assert_eq!(pool.blocks_for_tokens(0), 0);
        assert_eq!(pool.blocks_for_tokens(1), 1);
        assert_eq!(pool.blocks_for_tokens(16), 1);
        assert_eq!(pool.blocks_for_tokens(17), 2);
        assert_eq!(KvBlockPool::new(0, 0).usage(), 0.0);
    }
}
