//! Layer compressions, from their media types, and the inflating reader.
//!
//! gzip goes through flate2 on the zlib-rs backend (pure Rust, zlib-ng
//! speed); like Go's `gzip.Reader` that containerd uses, every concatenated
//! member is decoded. zstd goes through the `zstd` crate, every frame.

use std::fmt;
use std::io::{self, BufReader, Read};

use flate2::read::MultiGzDecoder;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer with this media type, or `None` for a
    /// media type this crate does not apply (the caller falls back to
    /// containerd's applier).
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Self::Zstd),
            _ => None,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::None => "uncompressed",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        })
    }
}

/// The uncompressed view of a layer stream.
pub(crate) enum Decoder<R: Read> {
    Plain(R),
    // Boxed: its inflate state is large, and the decoder is made once.
    Gzip(Box<MultiGzDecoder<R>>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<R>>),
}

impl<R: Read> Decoder<R> {
    pub(crate) fn new(compression: Compression, compressed: R) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Self::Plain(compressed),
            Compression::Gzip => Self::Gzip(Box::new(MultiGzDecoder::new(compressed))),
            Compression::Zstd => Self::Zstd(zstd::stream::read::Decoder::new(compressed)?),
        })
    }

    /// The compressed stream underneath (bytes it holds in a buffer have
    /// already been read from it).
    pub(crate) fn into_inner(self) -> R {
        match self {
            Self::Plain(reader) => reader,
            Self::Gzip(decoder) => (*decoder).into_inner(),
            Self::Zstd(decoder) => decoder.finish().into_inner(),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(reader) => reader.read(buffer),
            Self::Gzip(decoder) => decoder.read(buffer),
            Self::Zstd(decoder) => decoder.read(buffer),
        }
    }
}

impl<R: Read> fmt::Debug for Decoder<R> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let compression = match self {
            Self::Plain(_) => Compression::None,
            Self::Gzip(_) => Compression::Gzip,
            Self::Zstd(_) => Compression::Zstd,
        };
        formatter
            .debug_struct("Decoder")
            .field("compression", &compression)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn media_types() {
        let cases = [
            (
                "application/vnd.oci.image.layer.v1.tar",
                Some(Compression::None),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Some(Compression::Zstd),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar",
                Some(Compression::None),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
                Some(Compression::Zstd),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.zstd",
                Some(Compression::Zstd),
            ),
            ("application/vnd.oci.image.layer.v1.tar+bzip2", None),
            ("application/vnd.oci.image.config.v1+json", None),
            ("", None),
        ];
        for (media_type, expected) in cases {
            assert_eq!(
                Compression::from_media_type(media_type),
                expected,
                "{media_type}"
            );
        }
    }

    #[test]
    fn gzip_decodes_every_member() {
        let mut concatenated = Vec::new();
        for part in [&b"first "[..], &b"second"[..]] {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(part).unwrap();
            concatenated.extend(encoder.finish().unwrap());
        }
        let mut decoded = String::new();
        Decoder::new(Compression::Gzip, &concatenated[..])
            .unwrap()
            .read_to_string(&mut decoded)
            .unwrap();
        assert_eq!(decoded, "first second");
    }

    #[test]
    fn zstd_round_trip_and_corruption() {
        let compressed = zstd::encode_all(&b"hello zstd"[..], 3).unwrap();
        let mut decoded = String::new();
        Decoder::new(Compression::Zstd, &compressed[..])
            .unwrap()
            .read_to_string(&mut decoded)
            .unwrap();
        assert_eq!(decoded, "hello zstd");

        let garbage = b"definitely not zstd";
        let mut sink = Vec::new();
        Decoder::new(Compression::Zstd, &garbage[..])
            .unwrap()
            .read_to_end(&mut sink)
            .unwrap_err();
    }
}
