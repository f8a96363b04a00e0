#!/usr/bin/env python3
"""Writes an OCI image layout for the berth benchmark (bench/run.sh).

The image has one small layer with a static busybox (bin/busybox, bin/sleep, bin/sh), so that
containers can run `sleep`, and then LAYERS layers of LAYER_MIB MiB of random bytes each
(os.urandom: incompressible), one file per layer. Layers are tar + gzip, written in one
streaming pass that hashes both the compressed blob (digest) and the tar (diff id).

gzip level 0 (stored deflate blocks) is the default: random bytes do not compress at any
level, zlib level 1 only makes generation ~10x slower here, and the blob is still a real gzip
stream that both pullers must inflate and CRC-check. --gzip-level 1..9 is available.

With --dirs A,B,...: the layers are instead tars of those directories of this machine (one
layer per directory, as `tar -C / -c A`), a realistic compressible image (shared libraries,
headers, Python): use with --gzip-level 6, what `docker build` and most registries' images use.

Usage: mkimage.py OUT_DIR (--layers N --layer-mib M | --dirs A,B,...) [--gzip-level L]
                  [--busybox PATH]
Prints one JSON line: {"manifest": digest, "blobs": [{"digest", "size"}...] (config first)}.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import zlib

CHUNK = 1 << 20
MTIME = 1_700_000_000
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


class BlobWriter:
    """Compresses what is written to it into a temp file, hashing tar and gzip bytes."""

    def __init__(self, blobs_dir, level):
        self.blobs_dir = blobs_dir
        self.tmp_path = os.path.join(blobs_dir, f".tmp-{os.getpid()}-{os.urandom(4).hex()}")
        self.file = open(self.tmp_path, "wb")
        self.compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip wrapper
        self.diff = hashlib.sha256()
        self.blob = hashlib.sha256()
        self.size = 0

    def write(self, data):
        self.diff.update(data)
        self._out(self.compressor.compress(data))
        return len(data)

    def _out(self, data):
        if data:
            self.blob.update(data)
            self.file.write(data)
            self.size += len(data)

    def finish(self):
        self._out(self.compressor.flush())
        self.file.close()
        digest = "sha256:" + self.blob.hexdigest()
        os.replace(self.tmp_path, os.path.join(self.blobs_dir, digest.split(":")[1]))
        return digest, self.size, "sha256:" + self.diff.hexdigest()


def header(name, kind, size=0, mode=0o644, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = mode
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.linkname = link
    return info.tobuf(format=tarfile.GNU_FORMAT)


def pad(size):
    return b"\0" * ((512 - size % 512) % 512)


def busybox_layer(blobs_dir, level, busybox):
    writer = BlobWriter(blobs_dir, level)
    writer.write(header("bin/", tarfile.DIRTYPE, mode=0o755))
    size = os.path.getsize(busybox)
    writer.write(header("bin/busybox", tarfile.REGTYPE, size=size, mode=0o755))
    with open(busybox, "rb") as source:
        while data := source.read(CHUNK):
            writer.write(data)
    writer.write(pad(size))
    for applet in ("sh", "sleep", "true"):
        writer.write(header(f"bin/{applet}", tarfile.SYMTYPE, mode=0o777, link="busybox"))
    writer.write(b"\0" * 1024)
    return writer.finish()


def random_layer(blobs_dir, level, index, mib):
    writer = BlobWriter(blobs_dir, level)
    size = mib * CHUNK
    writer.write(header("data/", tarfile.DIRTYPE, mode=0o755))
    writer.write(header(f"data/layer-{index:02d}.bin", tarfile.REGTYPE, size=size))
    for _ in range(mib):
        writer.write(os.urandom(CHUNK))
    writer.write(b"\0" * 1024)
    return writer.finish()


def dir_layer(blobs_dir, level, path):
    """A tar of `path` (absolute) as it is on this machine, names relative to /, sorted."""
    writer = BlobWriter(blobs_dir, level)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for root, dirs, files in os.walk(path):
            dirs.sort()
            archive.add(root, arcname=os.path.relpath(root, "/"), recursive=False)
            for name in sorted(files):
                full = os.path.join(root, name)
                archive.add(full, arcname=os.path.relpath(full, "/"), recursive=False)
    return writer.finish()


def put_json(blobs_dir, document):
    data = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs_dir, digest.split(":")[1]), "wb") as out:
        out.write(data)
    return digest, len(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--layer-mib", type=int, default=0)
    parser.add_argument("--dirs", default="")
    parser.add_argument("--gzip-level", type=int, default=0)
    parser.add_argument("--busybox", default="/bin/busybox")
    args = parser.parse_args()

    if os.path.exists(args.out_dir):
        shutil.rmtree(args.out_dir)
    blobs_dir = os.path.join(args.out_dir, "blobs", "sha256")
    os.makedirs(blobs_dir)

    layers = [busybox_layer(blobs_dir, args.gzip_level, args.busybox)]
    for index in range(args.layers):
        layers.append(random_layer(blobs_dir, args.gzip_level, index, args.layer_mib))
    for path in filter(None, args.dirs.split(",")):
        layers.append(dir_layer(blobs_dir, args.gzip_level, path))

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sleep", "3600"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, _, diff_id in layers]},
        "history": [{"created_by": "bench/mkimage.py"} for _ in layers],
    }
    config_digest, config_size = put_json(blobs_dir, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": LAYER_TYPE, "digest": digest, "size": size}
            for digest, size, _ in layers
        ],
    }
    manifest_digest, manifest_size = put_json(blobs_dir, manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MANIFEST_TYPE,
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    with open(os.path.join(args.out_dir, "index.json"), "w") as out:
        json.dump(index, out)
    with open(os.path.join(args.out_dir, "oci-layout"), "w") as out:
        json.dump({"imageLayoutVersion": "1.0.0"}, out)

    blobs = [{"digest": config_digest, "size": config_size}]
    blobs += [{"digest": digest, "size": size} for digest, size, _ in layers]
    summary = {"manifest": manifest_digest, "blobs": blobs}
    with open(os.path.join(args.out_dir, "bench-image.json"), "w") as out:
        json.dump(summary, out)
    json.dump(summary, sys.stdout)
    print()


if __name__ == "__main__":
    main()
