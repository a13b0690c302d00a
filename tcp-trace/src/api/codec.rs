//! The TcpTrace service's codec: prost's, except that a request that does not decode is the
//! client's mistake and says so. tonic-prost answers it with INTERNAL, which reads as a fault of
//! the agent; build.rs points the generated server here (`codec_path`).
use tonic::{
    Status,
    codec::{BufferSettings, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

pub struct Codec<T, U>(ProstCodec<T, U>);

/// A stream's messages are encoded into one buffer that is sent once 32 KiB are in it (tonic's
/// yield threshold) or no message is ready. tonic starts that buffer at 8 KiB and grows it by
/// copying what it holds; starting above the threshold, a buffer is never regrown, so no event
/// is copied twice on a busy stream.
fn encode_buffer() -> BufferSettings {
    BufferSettings::new(64 << 10, 32 << 10)
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        ProstCodec::<T, U>::raw_encoder(encode_buffer())
    }

    fn decoder(&mut self) -> RequestDecoder<U> {
        RequestDecoder(self.0.decoder())
    }
}

/// Decodes requests; bytes that are not the method's message get INVALID_ARGUMENT.
pub struct RequestDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(src).map_err(|status| {
            Status::invalid_argument(format!(
                "the request is not this method's protobuf message ({}): check that the \
                 client was generated from proto/tcptrace/v1/tcptrace.proto",
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
