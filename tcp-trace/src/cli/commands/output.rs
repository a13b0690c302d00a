//! Where the clients write: standard output, in batches, with a closed pipe as an error of its own.

/// A client's standard output, written in batches. A closed pipe or a full disk is a
/// [`StdoutError`], never a panic (`println!` panics on both).
pub(super) struct Output {
    pub(super) buf: Vec<u8>,
}

impl Output {
    /// Written out once this full: a few hundred events.
    const BATCH: usize = 64 << 10;

    pub(super) fn new() -> Output {
        Output {
            buf: Vec::with_capacity(Self::BATCH + 4096),
        }
    }

    /// One answer and a newline.
    pub(super) fn line(text: &str) -> anyhow::Result<()> {
        let mut out = Output::new();
        out.buf.extend_from_slice(text.as_bytes());
        out.buf.push(b'\n');
        out.flush()
    }

    pub(super) fn flush_if_full(&mut self) -> anyhow::Result<()> {
        if self.buf.len() >= Self::BATCH {
            self.flush()?;
        }
        Ok(())
    }

    pub(super) fn flush(&mut self) -> anyhow::Result<()> {
        use std::io::Write as _;
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(&self.buf)
            .and_then(|()| stdout.flush())
            .map_err(StdoutError)?;
        self.buf.clear();
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write to stdout: {0}")]
pub struct StdoutError(std::io::Error);

impl StdoutError {
    /// The reader closed the pipe (Rust ignores SIGPIPE, so a write gets EPIPE instead).
    pub fn is_closed(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}
