//! Applies a 64 MiB layer of random (incompressible) files and one of
//! compressible text files, gzip and zstd, and prints MB/s, to compare with
//! containerd's applier on the same machine.
//!
//! `cargo run --release -p berth-unpack --example apply_bench`

#![allow(
    clippy::print_stdout,
    reason = "a benchmark's output is its report, as in bin/"
)]

use std::error::Error;
use std::io::Write;

use berth_unpack::apply::{apply_layer, LayerSpec, Limits, Target, Whiteouts};
use berth_unpack::compression::Compression;
use berth_unpack::digest::Sha256Digest;
use rand::RngCore;

const LAYER_BYTES: usize = 64 << 20;

fn tar_of(files: &[(String, Vec<u8>)]) -> Result<Vec<u8>, Box<dyn Error>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, &data[..])?;
    }
    Ok(builder.into_inner()?)
}

fn random_files() -> Vec<(String, Vec<u8>)> {
    let mut rng = rand::rng();
    (0..64)
        .map(|index| {
            let mut data = vec![0u8; LAYER_BYTES / 64];
            rng.fill_bytes(&mut data);
            (format!("random/{index}.bin"), data)
        })
        .collect()
}

fn text_files() -> Vec<(String, Vec<u8>)> {
    let file_bytes = 32 << 10;
    (0..LAYER_BYTES / file_bytes)
        .map(|index| {
            let mut data = Vec::with_capacity(file_bytes);
            let mut line = 0;
            while data.len() < file_bytes {
                let _ = writeln!(
                    data,
                    "{index:06} {line:05} GET /api/v1/items/{} status=200 bytes={} agent=berth",
                    (index * 31 + line) % 977,
                    (line * 7919) % 65_536
                );
                line += 1;
            }
            data.truncate(file_bytes);
            (format!("text/{}/{index}.log", index % 64), data)
        })
        .collect()
}

fn compress(tar: &[u8], compression: Compression) -> Result<Vec<u8>, Box<dyn Error>> {
    Ok(match compression {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(tar)?;
            encoder.finish()?
        }
        Compression::Zstd => zstd::encode_all(tar, 3)?,
    })
}

fn bench(name: &str, tar: &[u8], compression: Compression) -> Result<(), Box<dyn Error>> {
    let blob = compress(tar, compression)?;
    let spec = LayerSpec {
        compression,
        digest: Some(Sha256Digest::of(&blob)),
        size: blob.len() as u64,
        diff_id: Sha256Digest::of(tar),
    };
    let scratch = tempfile::tempdir()?;
    let target = Target {
        root: scratch.path().to_path_buf(),
        whiteouts: Whiteouts::Remove,
    };
    #[allow(
        clippy::disallowed_types,
        reason = "wall time of a synchronous run; there is no tokio clock here"
    )]
    let started = std::time::Instant::now();
    let applied = apply_layer(&blob[..], &spec, &target, &Limits::default())?;
    let seconds = started.elapsed().as_secs_f64();
    let megabytes = |bytes: u64| bytes as f64 / 1e6;
    println!(
        "{name:<12} {compression:<6} {:>7.1} MB -> {:>6.1} MB tar, {:>5} entries, {:>6.3} s: \
         {:>7.1} MB/s uncompressed, {:>7.1} MB/s compressed",
        megabytes(applied.compressed_size),
        megabytes(applied.uncompressed_size),
        applied.entries,
        seconds,
        megabytes(applied.uncompressed_size) / seconds,
        megabytes(applied.compressed_size) / seconds,
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let random = tar_of(&random_files())?;
    let text = tar_of(&text_files())?;
    for compression in [Compression::Gzip, Compression::Zstd] {
        bench("random", &random, compression)?;
        bench("compressible", &text, compression)?;
    }
    Ok(())
}
