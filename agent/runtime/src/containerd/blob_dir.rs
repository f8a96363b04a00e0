//! Layer blobs written straight into containerd's content store directory.
//!
//! Streaming a blob through `Content.Write` costs containerd as much CPU as its whole
//! `ctr images pull` (gRPC framing, a second SHA-256, the copy into its ingest). berth has
//! the bytes and their digest already, so, like containerd's own local store, it writes them
//! into an anonymous file (`O_TMPFILE`) in `<content root>/blobs/sha256`, syncs it, and links
//! it under its digest once the digest matched. containerd's default content sharing policy
//! then takes the file as it is: a `Content.Write` that names the expected digest finds the
//! blob in the backing store, and its commit only records it in the namespace, under the
//! pull's lease.
//!
//! Whether berthd sees containerd's content directory as containerd does (the same mount
//! namespace, writable, and content sharing `shared`) is probed once with a small blob
//! before any layer relies on it ([`Containerd::blob_dir`]); when it does not, layers go
//! through `Content.Write` as before. A blob containerd does not take as shared (a GC
//! removed the fresh file first, say) has its bytes streamed from the open file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::PluginsRequest;
use rustix::fs::{AtFlags, Mode, OFlags};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use super::content::CHUNK;
use super::{BlobWriter, Containerd, ContainerdError, Lease, OpenedBlob};

/// `<content root>/blobs/sha256`, where berthd writes layer blobs itself.
#[derive(Debug, Clone)]
pub struct BlobDir {
    dir: PathBuf,
}

/// Chunks queued for a blob file's writer thread before the download waits for it.
const QUEUED_CHUNKS: usize = 4;

/// A blob being written by its own blocking thread into an anonymous file in the blob dir.
#[derive(Debug)]
pub struct BlobFile {
    dir: PathBuf,
    sender: mpsc::Sender<bytes::Bytes>,
    task: JoinHandle<io::Result<File>>,
}

/// A complete, synced blob file, not yet linked under its digest.
#[derive(Debug)]
pub struct WrittenBlob {
    dir: PathBuf,
    file: File,
}

fn content_file(op: &'static str) -> impl FnOnce(io::Error) -> ContainerdError {
    move |source| ContainerdError::ContentFile { op, source }
}

impl BlobDir {
    /// Starts an anonymous file for one blob (nothing is left behind if it is dropped).
    pub fn create(&self) -> io::Result<BlobFile> {
        let file = anonymous_file(&self.dir)?;
        let (sender, mut receiver) = mpsc::channel::<bytes::Bytes>(QUEUED_CHUNKS);
        let task = tokio::task::spawn_blocking(move || {
            let mut file = file;
            while let Some(chunk) = receiver.blocking_recv() {
                file.write_all(&chunk)?;
            }
            // As containerd's local store does before it renames an ingest into place.
            file.sync_data()?;
            Ok(file)
        });
        Ok(BlobFile {
            dir: self.dir.clone(),
            sender,
            task,
        })
    }
}

impl BlobFile {
    /// Appends `chunk`; waits while the writer is `QUEUED_CHUNKS` behind.
    pub async fn write(&self, chunk: bytes::Bytes) -> io::Result<()> {
        if self.sender.send(chunk).await.is_ok() {
            return Ok(());
        }
        // The writer stopped: its error comes with `finish`.
        Err(io::Error::other("the blob file's writer stopped"))
    }

    /// Ends the blob: every byte written and synced to disk.
    pub async fn finish(self) -> io::Result<WrittenBlob> {
        let Self { dir, sender, task } = self;
        drop(sender);
        let file = task.await.map_err(io::Error::other)??;
        Ok(WrittenBlob { dir, file })
    }
}

fn anonymous_file(dir: &Path) -> io::Result<File> {
    let fd = rustix::fs::open(
        dir,
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        // containerd's committed blobs are read-only too.
        Mode::from_raw_mode(0o444),
    )?;
    Ok(File::from(fd))
}

/// Links an anonymous file into `dir` as `name`. An existing `name` is as good: blobs are
/// named by their content.
fn link(file: &File, dir: &Path, name: &str) -> io::Result<()> {
    let target = dir.join(name);
    let linked = rustix::fs::linkat(
        file.as_fd(),
        "",
        rustix::fs::CWD,
        &target,
        AtFlags::EMPTY_PATH,
    );
    let linked = match linked {
        // AT_EMPTY_PATH wants CAP_DAC_READ_SEARCH; the /proc path does not.
        Err(rustix::io::Errno::PERM | rustix::io::Errno::NOENT) => {
            let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
            rustix::fs::linkat(
                rustix::fs::CWD,
                proc_path.as_str(),
                rustix::fs::CWD,
                &target,
                AtFlags::SYMLINK_FOLLOW,
            )
        }
        other => other,
    };
    match linked {
        Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

fn hex_of(digest: &str) -> Result<&str, ContainerdError> {
    digest
        .strip_prefix("sha256:")
        .filter(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or(ContainerdError::Protocol {
            op: "content.write",
            reason: "a blob written into the content store needs a sha256 digest",
        })
}

impl Containerd {
    /// containerd's content store directory, if berthd can write blobs there itself: the
    /// content plugin's `root` export, and a probe blob written there that containerd then
    /// finds as shared content. `Err` says why not (the caller streams blobs instead).
    pub async fn blob_dir(&self) -> Result<BlobDir, String> {
        let root = self.content_root().await?;
        let dir = root.join("blobs").join("sha256");
        let made = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir);
        if let Err(err) = made {
            return Err(format!("cannot create {}: {err}", dir.display()));
        }
        let blob_dir = BlobDir { dir };
        match self.probe(&blob_dir).await {
            Ok(()) => Ok(blob_dir),
            Err(reason) => Err(reason),
        }
    }

    async fn content_root(&self) -> Result<PathBuf, String> {
        let reply = self
            .introspection()
            .plugins(tonic::Request::new(PluginsRequest {
                filters: vec!["type==io.containerd.content.v1".to_owned()],
            }))
            .await
            .map_err(|status| format!("introspection failed: {}", status.code()))?
            .into_inner();
        let root = reply
            .plugins
            .iter()
            .find(|plugin| plugin.id == "content")
            .and_then(|plugin| plugin.exports.get("root"))
            .ok_or("containerd's content plugin exports no root")?;
        let root = PathBuf::from(root);
        if !root.is_absolute() {
            return Err("containerd's content root is not an absolute path".to_owned());
        }
        Ok(root)
    }

    /// Writes a small random blob as layers are written and asks containerd for it: shared
    /// content means containerd reads the very directory berthd writes. The probe leaves
    /// nothing: its ingest is aborted and its file removed.
    async fn probe(&self, dir: &BlobDir) -> Result<(), String> {
        let nonce: u128 = rand::random();
        let data = format!("berth content store probe {nonce:032x}\n").into_bytes();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let hex = digest.trim_start_matches("sha256:").to_owned();
        let written = {
            let mut file = anonymous_file(&dir.dir)
                .map_err(|err| format!("cannot create a file in {}: {err}", dir.dir.display()))?;
            file.write_all(&data)
                .and_then(|()| link(&file, &dir.dir, &hex))
                .map_err(|err| format!("cannot write into {}: {err}", dir.dir.display()))
        };
        let path = dir.dir.join(&hex);
        let verdict = match written {
            Ok(()) => self.probe_shared(&digest, data.len() as u64).await,
            Err(reason) => Err(reason),
        };
        std::fs::remove_file(&path).ok();
        verdict
    }

    async fn probe_shared(&self, digest: &str, size: u64) -> Result<(), String> {
        let lease = self
            .create_lease("probe", std::time::Duration::from_secs(60))
            .await
            .map_err(|err| format!("probe lease: {err}"))?;
        let reference = format!("berth-probe-{}", digest.trim_start_matches("sha256:"));
        let opened = self.open_blob(&lease, &reference, digest, size).await;
        let verdict = match opened {
            Ok(OpenedBlob::Writer(writer)) => {
                let shared = writer.offset() == size;
                writer.abort().await.ok();
                if shared {
                    Ok(())
                } else {
                    Err(
                        "containerd does not see the blobs berthd writes into its content \
                         directory (another mount namespace, or content_sharing_policy is \
                         not \"shared\")"
                            .to_owned(),
                    )
                }
            }
            Ok(OpenedBlob::Present) => {
                Err("the probe blob was in the namespace already".to_owned())
            }
            Err(err) => Err(format!("probe: {err}")),
        };
        self.release(lease).await.ok();
        verdict
    }

    /// Links a written blob under its digest and commits it into the namespace under
    /// `lease` with `labels`. containerd takes the file as shared content; if it does not
    /// (the file vanished to a GC before the commit, or could not be linked), the bytes are
    /// streamed from the file.
    pub async fn store_blob_file(
        &self,
        lease: &Lease,
        reference: &str,
        digest: &str,
        size: u64,
        blob: WrittenBlob,
        labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let hex = hex_of(digest)?.to_owned();
        let WrittenBlob { dir, file } = blob;
        let (linked, file) = tokio::task::spawn_blocking(move || (link(&file, &dir, &hex), file))
            .await
            .map_err(|join| content_file("link")(io::Error::other(join)))?;
        if let Err(error) = linked {
            debug!(%digest, %error, "cannot link the blob file; streaming it");
        }
        match self.open_blob(lease, reference, digest, size).await? {
            OpenedBlob::Present => self.update_content_labels(digest, labels).await,
            OpenedBlob::Writer(writer) if writer.offset() == size => writer.commit(labels).await,
            OpenedBlob::Writer(mut writer) => {
                debug!(%digest, "containerd did not take the blob file as shared; streaming it");
                stream_file(&mut writer, file).await?;
                writer.commit(labels).await
            }
        }
    }

    /// Hands the bytes of a download that failed for now (`blob`, not linked) to the ingest
    /// `reference`, and leaves the ingest open: the next order resumes from its offset, as
    /// after a download that streamed into the ingest all along.
    pub async fn keep_partial_blob(
        &self,
        lease: &Lease,
        reference: &str,
        digest: &str,
        size: u64,
        blob: WrittenBlob,
    ) -> Result<(), ContainerdError> {
        match self.open_blob(lease, reference, digest, size).await? {
            OpenedBlob::Present => Ok(()),
            OpenedBlob::Writer(mut writer) => {
                stream_file(&mut writer, blob.file).await?;
                writer.flush().await
            }
        }
    }
}

/// Writes the whole of `file` into the ingest from byte 0.
async fn stream_file(writer: &mut BlobWriter, mut file: File) -> Result<(), ContainerdError> {
    writer.restart().await?;
    file.seek(SeekFrom::Start(0))
        .map_err(content_file("read"))?;
    loop {
        let (read, chunk) = tokio::task::spawn_blocking(move || {
            let mut chunk = vec![0u8; CHUNK];
            let read = file.read(&mut chunk);
            (read.map(|count| (count, file)), chunk)
        })
        .await
        .map_err(|join| content_file("read")(io::Error::other(join)))?;
        let (count, back) = read.map_err(content_file("read"))?;
        file = back;
        if count == 0 {
            return Ok(());
        }
        let mut chunk = chunk;
        chunk.truncate(count);
        writer.write(chunk).await?;
    }
}
