//! The codec of Cairn's services: prost's, except that a request that does
//! not decode is the caller's mistake (INVALID_ARGUMENT), not the server's
//! (prost's codec answers INTERNAL for every decode error). A response
//! that does not decode stays INTERNAL. Requests are the message types
//! whose name ends in `Request`, as every request of both packages does.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Prost's codec with decode errors of requests as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec { _pd: PhantomData }
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

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder {
            inner: ProstCodec::<T, U>::raw_decoder(BufferSettings::default()),
        }
    }
}

/// Prost's decoder, with a request's decode error as INVALID_ARGUMENT.
#[derive(Debug)]
pub struct RequestDecoder<U> {
    inner: ProstDecoder<U>,
}

/// Whether `U` is a request message.
fn is_request<U>() -> bool {
    std::any::type_name::<U>().ends_with("Request")
}

impl<U: prost::Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|s| {
            if is_request::<U>() {
                Status::invalid_argument(format!(
                    "the request could not be decoded: {}",
                    s.message()
                ))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_told_from_responses_by_name() {
        assert!(is_request::<crate::agent::CreateVolumeRequest>());
        assert!(is_request::<crate::coordinator::GetDiskRequest>());
        assert!(!is_request::<crate::agent::Volume>());
        assert!(!is_request::<crate::coordinator::Job>());
    }
}
