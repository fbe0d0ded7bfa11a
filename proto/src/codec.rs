//! The gRPC codec of every arcfed service: prost encoding with small initial buffers.
//!
//! tonic's default codec gives every stream an 8 KiB encode buffer and an 8 KiB decode
//! buffer, kept for the stream's life. A leader serving 50,000 agent streams (10,000 scale
//! sets × 5 clusters) would hold 800 MiB in those alone, while an agent message is a few
//! hundred bytes. These buffers start at 512 bytes and grow on demand (a Raft snapshot chunk
//! still fits: the buffer reserves what a message needs).

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Initial encode/decode buffer per call or stream.
pub const BUFFER_BYTES: usize = 512;
/// An encoder yields to the runtime once this much is buffered (tonic's default).
pub const YIELD_BYTES: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_BYTES)
}

/// [`ProstCodec`] with [`BUFFER_BYTES`] buffers (the generated code's `codec_path`).
#[derive(Debug, Clone)]
pub struct SmallCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        SmallCodec(std::marker::PhantomData)
    }
}

impl<T, U> Codec for SmallCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::codec::{Decoder, Encoder};

    #[test]
    fn buffers_start_small() {
        let mut c = SmallCodec::<crate::Keepalive, crate::Ack>::default();
        // The fields are private; their Debug form names them.
        let want = format!("buffer_size: {BUFFER_BYTES},");
        assert!(format!("{:?}", c.encoder().buffer_settings()).contains(&want));
        assert!(format!("{:?}", c.decoder().buffer_settings()).contains(&want));
    }
}
