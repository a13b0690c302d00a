//! Plain loads the verifier checks: fields of classic tracepoint records, and members of
//! BTF-typed kernel objects.
use aya_ebpf::{EbpfContext as _, programs::TracePointContext};

/// A value at `offset` from `base`, as one volatile load of its own size. The verifier accepts
/// a context load only at the field's own size and a constant offset, and checks a load from a
/// BTF-typed pointer against the kernel's BTF at its (constant) offset, turning it into a
/// fault-safe load; the volatile load keeps the compiler from splitting or merging it.
#[inline(always)]
pub fn load<T: Copy>(base: *const u8, offset: u32) -> T {
    unsafe { core::ptr::read_volatile(base.add(offset as usize).cast::<T>()) }
}

/// 16 bytes at `offset` (an address, a task's comm) as two 8-byte loads; `offset` is 8-aligned.
#[inline(always)]
pub fn load_bytes16(base: *const u8, offset: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&load::<u64>(base, offset).to_ne_bytes());
    out[8..].copy_from_slice(&load::<u64>(base, offset + 8).to_ne_bytes());
    out
}

/// A field of the tracepoint record: a direct context load, cheaper than a helper call.
#[inline(always)]
pub fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    load(ctx.as_ptr().cast(), offset as u32)
}

/// A 16-byte address field of the tracepoint record.
#[inline(always)]
pub fn address(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    load_bytes16(ctx.as_ptr().cast(), offset as u32)
}

#[inline(always)]
pub fn widen(v4: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&v4.to_ne_bytes());
    out
}
