//! Paged KV cache bookkeeping: the block pool (ref counts, free list), block tables,
//! and the prefix cache's block keys.
pub mod block_pool;
pub mod manager;
pub mod prefix_cache;

pub use block_pool::{KvBlockPool, DEFAULT_BLOCK_SIZE};
pub use manager::KvCacheManager;
