//! Reading fields of classic tracepoint records.
use aya_ebpf::{EbpfContext as _, programs::TracePointContext};

/// A field of the tracepoint record. Direct context loads: the verifier checks them against the
/// record and they cost less than a helper call, but it only accepts a load of the field's own
/// size at a constant offset from the context pointer, hence the volatile (single, sized) load.
#[inline(always)]
pub fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    unsafe { core::ptr::read_volatile(ctx.as_ptr().add(offset).cast::<T>()) }
}

/// A 16-byte address field as two 8-byte loads (both offsets are 8-aligned in the record).
#[inline(always)]
pub fn address(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    let high: u64 = field(ctx, offset);
    let low: u64 = field(ctx, offset + 8);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&high.to_ne_bytes());
    out[8..].copy_from_slice(&low.to_ne_bytes());
    out
}

#[inline(always)]
pub fn widen(v4: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&v4.to_ne_bytes());
    out
}
