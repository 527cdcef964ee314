//! Block tables per request on top of the block pool.
//!
//! A request's table lists the physical blocks that hold its tokens in order: token `i`
//! lives in block `table[i / block_size]` at slot `i % block_size`. Tables only grow while
//! a request runs, and are freed whole when it finishes or is preempted.
use std::collections::HashMap;

use super::block_pool::KvBlockPool;
use crate::scheduler::RequestId;

#[derive(Debug, Clone)]
pub struct KvCacheManager {
    pool: KvBlockPool,
    tables: HashMap<RequestId, Vec<u32>>,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            pool: KvBlockPool::new(num_blocks, block_size),
            tables: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.pool.block_size()
    }

    pub fn num_total_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    pub fn usage(&self) -> f32 {
        self.pool.usage()
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn num_blocks_needed(&self, num_tokens: usize) -> usize {
        self.pool.blocks_for_tokens(num_tokens)
    }

    /// Blocks that `allocate_slots(req_id, num_total_tokens)` would have to take from the pool.
    pub fn num_new_blocks_needed(&self, req_id: RequestId, num_total_tokens: usize) -> usize {
        let have = self.tables.get(&req_id).map_or(0, Vec::len);
        self.num_blocks_needed(num_total_tokens)
            .saturating_sub(have)
    }

    /// Make the request's table long enough for `num_total_tokens` tokens (those already
    /// cached plus those computed this step). All or nothing: false, changing nothing,
    /// when the pool lacks the blocks.
    pub fn allocate_slots(&mut self, req_id: RequestId, num_total_tokens: usize) -> bool {
        let need = self.num_new_blocks_needed(req_id, num_total_tokens);
        if need == 0 {
            // Still register the request so that block_table() answers for it.
            self.tables.entry(req_id).or_default();
            return true;
        }
        match self.pool.allocate(need) {
            Some(blocks) => {
                self.tables.entry(req_id).or_default().extend(blocks);
                true
            }
            None => false,
        }
    }

    /// Release every block of the request (nothing happens for an unknown id).
    pub fn free(&mut self, req_id: RequestId) {
        if let Some(table) = self.tables.remove(&req_id) {
            self.pool.free(&table);
        }
    }

    /// The request's physical blocks in token order (empty for an unknown id).
    pub fn block_table(&self, req_id: RequestId) -> &[u32] {
        self.tables.get(&req_id).map_or(&[], Vec::as_slice)
    }

    pub fn has_request(&self, req_id: RequestId) -> bool {
        self.tables.contains_key(&req_id)
    }

    pub fn num_requests(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_grow_block_by_block() {
        let mut kv = KvCacheManager::new(10, 4);
        assert!(kv.allocate_slots(1, 5)); // 2 blocks
        assert_eq!(kv.block_table(1).len(), 2);
        assert!(kv.allocate_slots(1, 8)); // still 2
        assert_eq!(kv.block_table(1).len(), 2);
        assert_eq!(kv.num_new_blocks_needed(1, 9), 1);
        assert!(kv.allocate_slots(1, 9));
        assert_eq!(kv.block_table(1).len(), 3);
        assert_eq!(kv.num_free_blocks(), 7);
        let table = kv.block_table(1).to_vec();
        assert!(kv.allocate_slots(1, 3), "shrinking asks for nothing");
        assert_eq!(kv.block_table(1), table.as_slice(), "and keeps the table");
    }

    #[test]
    fn allocation_is_all_or_nothing_per_request() {
        let mut kv = KvCacheManager::new(4, 4);
        assert!(kv.allocate_slots(1, 12)); // 3 blocks
        assert!(!kv.allocate_slots(2, 8), "needs 2, 1 free");
        assert_eq!(kv.block_table(2), &[] as &[u32]);
        assert_eq!(kv.num_free_blocks(), 1);
        assert!(!kv.allocate_slots(1, 20), "needs 2 more, 1 free");
        assert_eq!(
            kv.block_table(1).len(),
            3,
            "a failed grow keeps the old table"
        );
        assert!(kv.allocate_slots(2, 4));
        assert_eq!(kv.num_free_blocks(), 0);
    }

    #[test]
    fn free_returns_every_block() {
        let mut kv = KvCacheManager::new(6, 2);
        assert!(kv.allocate_slots(1, 3));
        assert!(kv.allocate_slots(2, 7));
        assert_eq!(kv.num_free_blocks(), 0);
        kv.free(1);
        assert_eq!(kv.num_free_blocks(), 2);
        assert!(!kv.has_request(1));
        kv.free(1); // twice: nothing happens
        kv.free(42);
        kv.free(2);
        assert_eq!(kv.num_free_blocks(), 6);
        assert_eq!(kv.num_requests(), 0);
        assert_eq!(kv.usage(), 0.0);
    }
}
