//! Paged KV cache bookkeeping: the block pool (ref counts, free list) and block tables.
