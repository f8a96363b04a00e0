//! The stream checks: digests, sizes, trailing data, decoding errors, and
//! feeding from an async download through `SyncIoBridge`.

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio_stream::wrappers::ReceiverStream;
    use tokio_util::io::{StreamReader, SyncIoBridge};

    use crate::apply::{apply_layer, Limits, Target, Whiteouts};
    use crate::compression::Compression;
    use crate::digest::Sha256Digest;
    use crate::error::{ApplyError, ApplyErrorKind};
    use crate::tests::fixture::{compress, read, Blob, Layer, Scratch};

    fn sample_tar() -> Vec<u8> {
        Layer::new().dir("d", 0o755).file("d/f", b"contents").tar()
    }

    #[test]
    fn wrong_compressed_digest_is_data_loss() {
        let scratch = Scratch::new();
        let mut blob = Blob::new(&sample_tar(), Compression::Gzip);
        let actual = blob.spec.digest.unwrap();
        let expected = Sha256Digest::of(b"something else");
        blob.spec.digest = Some(expected);
        let err = blob.apply(&scratch.root, Whiteouts::Remove).unwrap_err();
        assert!(
            matches!(err, ApplyError::CompressedDigest { .. }),
            "{err:?}"
        );
        assert!(err.is_data_loss());
        let message = err.to_string();
        assert!(message.contains("compressed"), "{message}");
        assert!(message.contains(&expected.to_string()), "{message}");
        assert!(message.contains(&actual.to_string()), "{message}");
    }

    #[test]
    fn wrong_diff_id_is_data_loss() {
        let scratch = Scratch::new();
        let mut blob = Blob::new(&sample_tar(), Compression::Zstd);
        let actual = blob.spec.diff_id;
        blob.spec.diff_id = Sha256Digest::of(b"another tar");
        let err = blob.apply(&scratch.root, Whiteouts::Remove).unwrap_err();
        assert!(matches!(err, ApplyError::DiffId { .. }), "{err:?}");
        assert_eq!(err.kind(), ApplyErrorKind::DataLoss);
        let message = err.to_string();
        assert!(message.contains("diff id"), "{message}");
        assert!(message.contains(&actual.to_string()), "{message}");
    }

    #[test]
    fn bytes_past_the_descriptor_size_are_refused() {
        let scratch = Scratch::new();
        let mut blob = Blob::new(&sample_tar(), Compression::None);
        blob.bytes.extend_from_slice(&[0u8; 1024]);
        let err = blob.apply(&scratch.root, Whiteouts::Remove).unwrap_err();
        assert!(
            matches!(err, ApplyError::CompressedOverrun { .. }),
            "{err:?}"
        );
        assert!(err.is_data_loss());
    }

    #[test]
    fn a_short_blob_is_data_loss() {
        let scratch = Scratch::new();
        let mut blob = Blob::new(&sample_tar(), Compression::Gzip);
        blob.spec.size += 10;
        let err = blob.apply(&scratch.root, Whiteouts::Remove).unwrap_err();
        assert!(matches!(err, ApplyError::CompressedSize { .. }), "{err:?}");
    }

    #[test]
    fn trailing_tar_padding_is_part_of_both_digests() {
        let mut tar = sample_tar();
        // A 10 KiB record, as GNU tar pads to.
        tar.resize(tar.len() + 10240, 0);
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let scratch = Scratch::new();
            let blob = Blob::new(&tar, compression);
            let applied = blob.apply(&scratch.root, Whiteouts::Remove).unwrap();
            assert_eq!(applied.uncompressed_size, tar.len() as u64);
            assert_eq!(applied.diff_id, Sha256Digest::of(&tar));
            assert_eq!(read(&scratch.path("d/f")), "contents");
        }
    }

    #[test]
    fn corrupt_compression_is_invalid_unless_the_digest_also_fails() {
        let scratch = Scratch::new();
        let mut bytes = compress(&sample_tar(), Compression::Gzip);
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        bytes[middle + 1] ^= 0xff;
        let mut blob = Blob::new(&sample_tar(), Compression::Gzip);
        blob.bytes = bytes.clone();
        // The descriptor names the original: corruption in transit.
        let err = blob.apply(&scratch.root, Whiteouts::Remove).unwrap_err();
        assert!(err.is_data_loss(), "{err:?}");
        // The descriptor names the corrupt blob itself: a malformed layer.
        blob.spec.digest = Some(Sha256Digest::of(&bytes));
        let err = blob.apply(&scratch.root, Whiteouts::Remove).unwrap_err();
        assert!(matches!(err, ApplyError::Decompress { .. }), "{err:?}");
        assert_eq!(err.kind(), ApplyErrorKind::InvalidLayer);
    }

    #[test]
    fn input_errors_are_io() {
        struct Failing;
        impl std::io::Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "reset",
                ))
            }
        }
        let scratch = Scratch::new();
        let blob = Blob::new(&sample_tar(), Compression::Gzip);
        let target = Target {
            root: scratch.root.clone(),
            whiteouts: Whiteouts::Remove,
        };
        let err = apply_layer(Failing, &blob.spec, &target, &Limits::default()).unwrap_err();
        assert!(matches!(err, ApplyError::Read { .. }), "{err:?}");
        assert_eq!(err.kind(), ApplyErrorKind::Io);
    }

    #[tokio::test]
    async fn applies_from_a_channel_of_chunks_through_sync_io_bridge() {
        let mut layer = Layer::new();
        for index in 0..50 {
            layer.file(
                &format!("files/{index}"),
                &vec![u8::try_from(index).unwrap(); 10_000],
            );
        }
        let blob = Blob::new(&layer.tar(), Compression::Gzip);
        let scratch = Scratch::new();
        let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        let chunks: Vec<Bytes> = blob.bytes.chunks(777).map(Bytes::copy_from_slice).collect();
        let producer = tokio::spawn(async move {
            for chunk in chunks {
                sender.send(Ok(chunk)).await.unwrap();
            }
        });
        let reader = SyncIoBridge::new(StreamReader::new(ReceiverStream::new(receiver)));
        let target = Target {
            root: scratch.root.clone(),
            whiteouts: Whiteouts::Remove,
        };
        let spec = blob.spec.clone();
        let applied = tokio::task::spawn_blocking(move || {
            apply_layer(reader, &spec, &target, &Limits::default())
        })
        .await
        .unwrap()
        .unwrap();
        producer.await.unwrap();
        assert_eq!(applied.entries, 50);
        assert_eq!(applied.compressed_size, blob.bytes.len() as u64);
        assert_eq!(
            std::fs::read(scratch.path("files/49")).unwrap(),
            vec![49u8; 10_000]
        );
    }
}
