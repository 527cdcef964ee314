//! Block tables per request on top of the block pool.
//!
//! A request's table lists the physical blocks that hold its tokens in order: token `i`
//! lives in block `table[i / block_size]` at slot `i % block_size`. Tables only grow while
//! a request runs, and are freed whole when it finishes or is preempted.
//!
//! With prefix caching on, full blocks are indexed by content once computed, and a new
//! (or preempted) request starts from the longest run of cached blocks matching its tokens.
//!
//! With a sliding window on every layer (vLLM's `SlidingWindowManager`), the blocks that lie
//! wholly before the earliest key any remaining query of a request can attend go back to the
//! pool while it runs, and their entries in its table become `NULL_BLOCK`: the table keeps
//! its length (token `i` is still at `table[i / block_size]`), and its leading
//! `num_skipped` entries are placeholders that are never freed again nor cached.
use std::collections::HashMap;

use super::block_pool::KvBlockPool;
use super::prefix_cache::{block_keys, BlockKey};
use crate::types::RequestId;

/// The block-table entry of a block the sliding window let go. vLLM reserves a null block
/// for it; here it is block 0, a valid index that may well belong to another request, so
/// that every table stays a list of valid ids (`ForwardBatch::validate`) and the pool keeps
/// every block. No kernel writes through it (the KV of a step's new tokens goes to their own
/// positions, which are never skipped) and none uses its contents: the CPU attention and the
/// CUDA decode kernels read keys from the window's first on, and the CUDA prefill kernel,
/// whose key tiles start 64-aligned, may load it only for keys it masks out, and the cache is
/// zeroed at allocation and holds finite values only, so that a masked key adds exactly 0.
pub const NULL_BLOCK: u32 = 0;

/// The window whose left-behind blocks can go: the largest of the layers' windows when every
/// layer has one (Mistral v0.1 style); None when some layer attends to everything (Gemma's
/// global layers), since that layer needs every block.
pub fn uniform_window(layer_windows: impl IntoIterator<Item = Option<usize>>) -> Option<usize> {
    let windows: Option<Vec<usize>> = layer_windows.into_iter().collect();
    windows.and_then(|w| w.into_iter().max()).filter(|&w| w > 0)
}

/// The most blocks a request of `num_tokens` tokens can hold at once, its prefill in chunks of
/// at most `chunk_tokens`: all of them, or under a sliding window (`uniform_window`) those
/// the window and two chunks span (the chunk still in flight reads its window while the next
/// one is placed), plus two for block boundaries. Admission and the `--max-model-len` check
/// use it, so a windowed model takes contexts longer than its cache, as in vLLM.
pub fn max_blocks_held(
    num_tokens: usize,
    block_size: usize,
    window: Option<usize>,
    chunk_tokens: usize,
) -> usize {
    let all = num_tokens.div_ceil(block_size);
    match window {
        Some(w) => all.min((w + 2 * chunk_tokens).div_ceil(block_size) + 2),
        None => all,
    }
}

#[derive(Debug, Clone)]
pub struct KvCacheManager {
    pool: KvBlockPool,
    tables: HashMap<RequestId, Vec<u32>>,
    prefix_caching: bool,
    /// Per request: hashes of its leading full blocks already registered in the cache.
    block_hashes: HashMap<RequestId, Vec<u64>>,
    /// The attention window of every layer (`None`: some layer sees the whole context, so
    /// that every block stays). A query at position `p` sees keys `p + 1 - window ..= p`.
    sliding_window: Option<usize>,
    /// Per request: leading table entries the window let go (`NULL_BLOCK` placeholders).
    num_skipped: HashMap<RequestId, usize>,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            pool: KvBlockPool::new(num_blocks, block_size),
            tables: HashMap::new(),
            prefix_caching: false,
            block_hashes: HashMap::new(),
            sliding_window: None,
            num_skipped: HashMap::new(),
        }
    }

    /// Free the blocks a sliding window leaves behind (`window`: the window of every layer;
    /// None, or a model with any full-attention layer, keeps every block). A window of 0
    /// means none, as in the attention code.
    pub fn set_sliding_window(&mut self, window: Option<usize>) {
        self.sliding_window = window.filter(|&w| w > 0);
    }

    pub fn sliding_window(&self) -> Option<usize> {
        self.sliding_window
    }

    /// Turn on prefix caching (reuse of computed full blocks with the same token prefix).
    pub fn with_prefix_caching(mut self, enabled: bool) -> Self {
        self.prefix_caching = enabled;
        self
    }

    /// Switch prefix caching on or off at any time (switching off keeps what is cached but
    /// stops reusing and indexing blocks).
    pub fn set_prefix_caching(&mut self, enabled: bool) {
        self.prefix_caching = enabled;
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Blocks whose contents the prefix cache holds (in use or free).
    pub fn num_cached_blocks(&self) -> usize {
        self.pool.num_cached()
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

    /// The most blocks a request of `num_tokens` tokens holds at once, its prefill in chunks
    /// of at most `chunk_tokens` (`max_blocks_held`).
    pub fn max_blocks_held(&self, num_tokens: usize, chunk_tokens: usize) -> usize {
        max_blocks_held(
            num_tokens,
            self.block_size(),
            self.sliding_window,
            chunk_tokens,
        )
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

    /// Start a request that holds no blocks from the longest cached prefix of `tokens`:
    /// those blocks join its table and the number of tokens they cover is returned (a
    /// multiple of the block size). At least one token is always left uncached, because
    /// computing it is what produces the next token's logits. 0 when caching is off.
    ///
    /// With a sliding window only the blocks the first uncached token's query can see must
    /// be cached (vLLM's sliding-window cache hit): the longest prefix whose last blocks, as
    /// far back as the window reaches, are all cached is taken, and the blocks before them
    /// start as `NULL_BLOCK` placeholders, cached or not.
    pub fn acquire_cached_prefix(&mut self, req_id: RequestId, tokens: &[u32]) -> usize {
        if !self.prefix_caching || self.tables.get(&req_id).is_some_and(|t| !t.is_empty()) {
            return 0;
        }
        let bs = self.block_size();
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        if let Some(window) = self.sliding_window {
            return self.acquire_cached_window(req_id, tokens, max_blocks, window);
        }
        let mut table = Vec::new();
        let mut hashes = Vec::new();
        for key in block_keys(tokens, bs, max_blocks) {
            let Some(block) = self.pool.lookup(&key) else {
                break;
            };
            self.pool.acquire_cached(block);
            table.push(block);
            hashes.push(key.hash);
        }
        let cached_tokens = table.len() * bs;
        self.tables.insert(req_id, table);
        self.block_hashes.insert(req_id, hashes);
        cached_tokens
    }

    /// `acquire_cached_prefix` under a sliding window of `window` tokens.
    fn acquire_cached_window(
        &mut self,
        req_id: RequestId,
        tokens: &[u32],
        max_blocks: usize,
        window: usize,
    ) -> usize {
        let bs = self.block_size();
        let keys: Vec<BlockKey> = block_keys(tokens, bs, max_blocks).collect();
        let found: Vec<Option<u32>> = keys.iter().map(|k| self.pool.lookup(k)).collect();
        // run[i]: cached blocks in a row ending at block i.
        let mut run = vec![0usize; found.len()];
        for i in 0..found.len() {
            if found[i].is_some() {
                run[i] = 1 + if i > 0 { run[i - 1] } else { 0 };
            }
        }
        // A hit of n blocks: the query at n * bs sees keys from n * bs + 1 - window on, in
        // blocks first..n, which must all be cached (as `free_skipped_blocks` would keep).
        let hit = (1..=found.len()).rev().find_map(|n| {
            let first = ((n * bs + 1).saturating_sub(window) / bs).min(n);
            (first < n && run[n - 1] >= n - first).then_some((first, n))
        });
        let (first, n) = hit.unwrap_or((0, 0));
        let mut table = vec![NULL_BLOCK; first];
        for block in found[first..n].iter().flatten() {
            self.pool.acquire_cached(*block);
            table.push(*block);
        }
        self.tables.insert(req_id, table);
        self.block_hashes
            .insert(req_id, keys[..n].iter().map(|k| k.hash).collect());
        if first > 0 {
            self.num_skipped.insert(req_id, first);
        }
        n * bs
    }

    /// With a sliding window: give back the request's blocks that no query from position
    /// `first_query_pos` on can attend (those wholly before `first_query_pos + 1 - window`),
    /// leaving `NULL_BLOCK` in their table entries. Returns how many blocks it let go. The
    /// caller passes the position of the request's earliest query not yet computed, a step
    /// still running included, so that no block a step reads goes back. Blocks another owner
    /// shares stay allocated for it; freed blocks keep their prefix-cache entries until
    /// reused, so that a later request with the same prefix may still find the whole chain.
    pub fn free_skipped_blocks(&mut self, req_id: RequestId, first_query_pos: usize) -> usize {
        let Some(window) = self.sliding_window else {
            return 0;
        };
        let Some(table) = self.tables.get_mut(&req_id) else {
            return 0;
        };
        let bs = self.pool.block_size();
        let skip = ((first_query_pos + 1).saturating_sub(window) / bs).min(table.len());
        let skipped = self.num_skipped.entry(req_id).or_insert(0);
        if skip <= *skipped {
            return 0;
        }
        let gone: Vec<u32> = table[*skipped..skip].to_vec();
        table[*skipped..skip].fill(NULL_BLOCK);
        *skipped = skip;
        // `free` releases last-first; reversed, the oldest block goes first on the free list
        // and is reused first, keeping the newer (more likely shared) ones cached longer.
        let oldest_last: Vec<u32> = gone.iter().rev().copied().collect();
        self.pool.free(&oldest_last);
        gone.len()
    }

    /// Blocks the request holds (its table less the entries the window let go).
    pub fn num_held_blocks(&self, req_id: RequestId) -> usize {
        self.block_table(req_id).len() - self.num_skipped.get(&req_id).copied().unwrap_or(0)
    }

    /// Index the request's blocks that are now full and computed (`num_computed_tokens` of
    /// `tokens` have KV entries), so that later requests can reuse them. Call after the step
    /// that computed them ran, never before: a block is only shared once it is written.
    pub fn cache_computed_blocks(
        &mut self,
        req_id: RequestId,
        tokens: &[u32],
        num_computed_tokens: usize,
    ) {
        if !self.prefix_caching {
            return;
        }
        let bs = self.block_size();
        let Some(table) = self.tables.get(&req_id) else {
            return;
        };
        let full = (num_computed_tokens.min(tokens.len()) / bs).min(table.len());
        let skipped = self.num_skipped.get(&req_id).copied().unwrap_or(0);
        let hashes = self.block_hashes.entry(req_id).or_default();
        while hashes.len() < full {
            let i = hashes.len();
            let key = BlockKey::new(hashes.last().copied(), &tokens[i * bs..(i + 1) * bs]);
            hashes.push(key.hash);
            // A block the window let go before it was indexed is gone (its entry is the
            // placeholder): the chain keeps its hash, and lookups stop at the hole.
            if i >= skipped {
                self.pool.register(table[i], key);
            }
        }
    }

    /// Release every block of the request (nothing happens for an unknown id).
    pub fn free(&mut self, req_id: RequestId) {
        self.block_hashes.remove(&req_id);
        let skipped = self.num_skipped.remove(&req_id).unwrap_or(0);
        if let Some(table) = self.tables.remove(&req_id) {
            self.pool.free(&table[skipped.min(table.len())..]);
        }
    }

    /// The request's physical blocks in token order (empty for an unknown id); entries the
    /// sliding window let go are `NULL_BLOCK`.
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
    fn a_window_bounds_the_blocks_a_request_holds_only_when_every_layer_has_it() {
        assert_eq!(uniform_window([Some(20), Some(20)]), Some(20));
        assert_eq!(uniform_window([Some(16), Some(32)]), Some(32));
        assert_eq!(uniform_window([Some(16), None]), None, "a global layer");
        assert_eq!(uniform_window([Some(0)]), None, "0 is no window");
        // 512 tokens in blocks of 4: 128 blocks; a window of 20 and chunks of 32 span
        // (20 + 64) / 4 = 21 blocks, 2 more for block boundaries.
        assert_eq!(max_blocks_held(512, 4, None, 32), 128);
        assert_eq!(max_blocks_held(512, 4, Some(20), 32), 23);
        assert_eq!(
            max_blocks_held(40, 4, Some(20), 32),
            10,
            "never more than all"
        );
        let mut kv = KvCacheManager::new(30, 4);
        assert_eq!(kv.max_blocks_held(512, 32), 128);
        kv.set_sliding_window(Some(20));
        assert_eq!(kv.max_blocks_held(512, 32), 23);
    }

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

    #[test]
    fn a_shared_prefix_is_reused_once_computed() {
        let mut kv = KvCacheManager::new(8, 2).with_prefix_caching(true);
        let a = [1, 2, 3, 4, 5, 6, 7];
        assert_eq!(kv.acquire_cached_prefix(1, &a), 0, "nothing cached yet");
        assert!(kv.allocate_slots(1, 7));
        // Not computed yet: nothing to share.
        assert_eq!(kv.acquire_cached_prefix(2, &a), 0);
        kv.free(2);
        kv.cache_computed_blocks(1, &a, 5); // blocks [1,2] and [3,4] are full and computed
        assert_eq!(kv.num_cached_blocks(), 2);

        let b = [1, 2, 3, 4, 9, 9, 9];
        assert_eq!(kv.acquire_cached_prefix(2, &b), 4);
        assert_eq!(kv.block_table(2), &kv.block_table(1)[..2]);
        assert!(kv.allocate_slots(2, 7));
        assert_eq!(
            kv.num_free_blocks(),
            8 - 4 - 2,
            "the shared blocks are counted once"
        );

        // A different first block shares nothing, even with the same second block.
        assert_eq!(kv.acquire_cached_prefix(3, &[0, 2, 3, 4, 5]), 0);
        kv.free(3);

        // The last token is always computed, even when every block is cached.
        assert_eq!(kv.acquire_cached_prefix(4, &[1, 2, 3, 4]), 2);
        kv.free(4);

        // Freed blocks stay cached until reused.
        kv.free(1);
        kv.free(2);
        assert_eq!(kv.num_free_blocks(), 8);
        assert_eq!(kv.acquire_cached_prefix(5, &a), 4);
        kv.free(5);
        assert_eq!(kv.num_free_blocks(), 8);
    }

    #[test]
    fn caching_off_never_shares() {
        let mut kv = KvCacheManager::new(8, 2);
        assert!(kv.allocate_slots(1, 4));
        kv.cache_computed_blocks(1, &[1, 2, 3, 4], 4);
        assert_eq!(kv.acquire_cached_prefix(2, &[1, 2, 3, 4, 5]), 0);
        assert_eq!(kv.num_cached_blocks(), 0);
    }

    #[test]
    fn the_window_frees_the_blocks_wholly_before_it() {
        let mut kv = KvCacheManager::new(10, 4);
        assert!(kv.allocate_slots(1, 20)); // 5 blocks
        assert_eq!(
            kv.free_skipped_blocks(1, 19),
            0,
            "no window: every block stays"
        );
        kv.set_sliding_window(Some(6));
        let table = kv.block_table(1).to_vec();
        // A query at 11 sees keys 6..=11: block 0 (keys 0..4) is wholly before, block 1 not.
        assert_eq!(kv.free_skipped_blocks(1, 11), 1);
        assert_eq!(kv.block_table(1)[0], NULL_BLOCK);
        assert_eq!(&kv.block_table(1)[1..], &table[1..]);
        assert_eq!((kv.num_held_blocks(1), kv.num_free_blocks()), (4, 6));
        // Keys 8.. at 13: block 1 goes; asking again, or for an earlier query, frees nothing.
        assert_eq!(kv.free_skipped_blocks(1, 13), 1);
        assert_eq!(kv.free_skipped_blocks(1, 13), 0);
        assert_eq!(kv.free_skipped_blocks(1, 3), 0);
        assert_eq!(
            kv.block_table(1).len(),
            5,
            "token i is still at table[i / 4]"
        );
        // Growing the table counts the placeholders as entries.
        assert_eq!(kv.num_new_blocks_needed(1, 24), 1);
        assert!(kv.allocate_slots(1, 24));
        // Never more than the table: a query far ahead frees every block it has.
        assert_eq!(kv.free_skipped_blocks(1, 1000), 4);
        assert_eq!(kv.num_free_blocks(), 10);
        kv.free(1);
        assert_eq!(kv.num_free_blocks(), 10, "placeholders are not freed again");
        assert_eq!(kv.free_skipped_blocks(1, 100), 0, "unknown request");
    }

    #[test]
    fn shared_blocks_stay_for_their_other_owner() {
        let mut kv = KvCacheManager::new(8, 2).with_prefix_caching(true);
        kv.set_sliding_window(Some(2));
        let a = [1, 2, 3, 4, 5, 6, 7];
        assert!(kv.allocate_slots(1, 7));
        kv.cache_computed_blocks(1, &a, 6);
        // Taken whole (no window yet), then the window lets some go.
        kv.set_sliding_window(None);
        assert_eq!(kv.acquire_cached_prefix(2, &a), 6);
        kv.set_sliding_window(Some(2));
        let shared = kv.block_table(2).to_vec();
        // Request 2's next query is at 6 (keys 5..): blocks 0 and 1 go, block 2 stays.
        assert_eq!(kv.free_skipped_blocks(2, 6), 2);
        assert_eq!(kv.block_table(1)[..2], shared[..2], "request 1 keeps them");
        assert_eq!(kv.num_free_blocks(), 8 - 4);
        kv.free(1);
        kv.free(2);
        assert_eq!(kv.num_free_blocks(), 8);
    }

    #[test]
    fn a_prefix_hit_never_spans_a_hole() {
        let mut kv = KvCacheManager::new(6, 2).with_prefix_caching(true);
        kv.set_sliding_window(Some(2));
        let a = [1, 2, 3, 4, 5, 6, 7];
        assert!(kv.allocate_slots(1, 7));
        // Block 0 is indexed; then blocks 0 and 1 go before block 1 was: a hole there.
        kv.cache_computed_blocks(1, &a, 2);
        assert_eq!(kv.free_skipped_blocks(1, 5), 2);
        kv.cache_computed_blocks(1, &a, 6);
        let cached = kv.num_cached_blocks();
        assert_eq!(cached, 2, "blocks 0 and 2, not the placeholder");
        // Without a window a hit is whole from the start: block 0 (free, still cached) only.
        kv.set_sliding_window(None);
        assert_eq!(kv.acquire_cached_prefix(2, &a), 2);
        kv.free(2);
        // Under it, the query at 6 needs block 2 alone: the hole becomes a placeholder.
        kv.set_sliding_window(Some(2));
        let b2 = kv.block_table(1)[2];
        assert_eq!(kv.acquire_cached_prefix(3, &a), 6);
        assert_eq!(kv.block_table(3), &[NULL_BLOCK, NULL_BLOCK, b2]);
        kv.free(3);
        kv.free(1);
        // Taking every block for others evicts everything: no hit at all.
        assert!(kv.allocate_slots(4, 12));
        assert_eq!(kv.acquire_cached_prefix(5, &a), 0);
    }

    #[test]
    fn under_a_window_a_prefix_hit_needs_only_the_blocks_the_window_sees() {
        let mut kv = KvCacheManager::new(6, 2).with_prefix_caching(true);
        kv.set_sliding_window(Some(4));
        let a: Vec<u32> = (10..21).collect(); // 11 tokens, 6 blocks
        assert!(kv.allocate_slots(1, 11));
        kv.cache_computed_blocks(1, &a, 10); // blocks 0..5 indexed
        let table = kv.block_table(1).to_vec();
        // Its query at 10 sees keys 7..: blocks 0, 1 and 2 go (oldest first on the free list).
        assert_eq!(kv.free_skipped_blocks(1, 10), 3);
        assert!(
            kv.allocate_slots(2, 2),
            "takes block 0, evicting its contents"
        );
        assert_eq!(kv.block_table(2), &table[..1]);
        // Block 0 is gone, yet a query at 10 needs only blocks 3 and 4: a hit of 10 tokens.
        assert_eq!(kv.acquire_cached_prefix(3, &a), 10);
        assert_eq!(
            kv.block_table(3),
            &[NULL_BLOCK, NULL_BLOCK, NULL_BLOCK, table[3], table[4]]
        );
        assert_eq!(kv.num_held_blocks(3), 2);
        // Without the window the hole at block 0 allows no hit at all.
        kv.set_sliding_window(None);
        assert_eq!(kv.acquire_cached_prefix(4, &a), 0);
        kv.set_sliding_window(Some(4));
        // A prefix whose window reaches an evicted block hits up to where it does not: for
        // 7 tokens (3 blocks at most), block 2's query at 6 needs blocks 1 and 2, and block
        // 2 is cached but free, block 1 too; a hit of 3 blocks.
        assert_eq!(kv.acquire_cached_prefix(5, &a[..7]), 6);
        assert_eq!(kv.block_table(5), &[NULL_BLOCK, table[1], table[2]]);
        for id in [1, 2, 3, 4, 5] {
            kv.free(id);
        }
        assert_eq!(kv.num_free_blocks(), 6, "placeholders are never freed");
    }
}
