//! A small per-thread cache of free I/O buffers.
//!
//! Connections give their buffers back whenever they wait for data (so an idle connection holds
//! none), and a busy request/response connection waits for data after every message. Freeing
//! and allocating 16–256 KiB each time can make the allocator return memory to the kernel and
//! fault it back in, which costs tens of microseconds per message; this cache hands the same
//! buffers back instead. It keeps at most [`KEEP_BYTES`] per thread, so its memory is bounded
//! whatever the number of connections.

use std::cell::RefCell;

use bytes::BytesMut;

/// The most a thread keeps in free buffers.
pub const KEEP_BYTES: usize = 2 * 1024 * 1024;

thread_local! {
    static FREE: RefCell<(Vec<BytesMut>, usize)> = const { RefCell::new((Vec::new(), 0)) };
}

/// An empty buffer of exactly `size` bytes of capacity, from the cache when one is there.
pub fn take(size: usize) -> BytesMut {
    let cached = FREE.with(|f| {
        let mut f = f.try_borrow_mut().ok()?;
        let i = f.0.iter().rposition(|b| b.capacity() == size)?;
        let b = f.0.swap_remove(i);
        f.1 -= size;
        Some(b)
    });
    cached.unwrap_or_else(|| BytesMut::with_capacity(size))
}

/// Gives a buffer back (its contents are discarded); dropped if the cache is full.
pub fn give(mut b: BytesMut) {
    let cap = b.capacity();
    if cap == 0 {
        return;
    }
    b.clear();
    FREE.with(|f| {
        if let Ok(mut f) = f.try_borrow_mut()
            && f.1 + cap <= KEEP_BYTES
        {
            f.1 += cap;
            f.0.push(b);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_the_cache_is_bounded() {
        let mut b = take(64 * 1024);
        b.extend_from_slice(b"data");
        let ptr = b.as_ptr();
        give(b);
        let again = take(64 * 1024);
        assert_eq!(again.as_ptr(), ptr, "the same buffer is reused");
        assert!(again.is_empty(), "a reused buffer starts empty");
        assert_eq!(again.capacity(), 64 * 1024);
        // Far more than the bound: the cache keeps at most KEEP_BYTES.
        for _ in 0..(KEEP_BYTES / (64 * 1024)) * 3 {
            give(BytesMut::with_capacity(64 * 1024));
        }
        let kept = FREE.with(|f| f.borrow().1);
        assert!(kept <= KEEP_BYTES, "{kept}");
    }
}
