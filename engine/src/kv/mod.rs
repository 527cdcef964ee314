//! Paged KV cache bookkeeping: the block pool (ref counts, free list) and block tables.
pub mod block_pool;
pub mod manager;

pub use block_pool::{KvBlockPool, DEFAULT_BLOCK_SIZE};
pub use manager::KvCacheManager;
