//! Paged KV cache bookkeeping: the block pool (ref counts, free list), block tables,
//! the prefix cache's block keys, and the blocks a sliding window lets go.
pub mod block_pool;
pub mod manager;
pub mod prefix_cache;

pub use block_pool::{KvBlockPool, DEFAULT_BLOCK_SIZE};
pub use manager::{max_blocks_held, uniform_window, KvCacheManager, NULL_BLOCK};
