#!/usr/bin/env python3
"""How a small upload's file could reach the provider's root, in the kernel alone.

  create+rename: what upgate does today with the local provider (and nginx's WebDAV PUT):
                 create the file in the spool, write it, rename it into the root.
  tmpfile+link:  an anonymous file (O_TMPFILE) in the spool's filesystem, written, then
                 linked into the root (linkat of /proc/self/fd/N with AT_SYMLINK_FOLLOW):
                 one directory entry made instead of one made and one moved.

Each round formats a fresh ext4 image (a filesystem that just deleted many files searches
for free inodes differently) and writes FILES files of 1 KiB from THREADS threads (the GIL
is released in every system call). Prints the wall time and the process's system CPU time
per file for each method, alternating, ROUNDS rounds. Needs root (mkfs, loop mount).

  sudo bench/dirops.py [--files 20000] [--threads 4] [--rounds 3] [--image /var/tmp/dirops.img]
"""
import argparse
import ctypes
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
LIBC = ctypes.CDLL(None, use_errno=True)
DATA = b"x" * 1024


def fresh_filesystem(image, mount):
    subprocess.run(["umount", mount], stderr=subprocess.DEVNULL, check=False)
    subprocess.run(["truncate", "-s", "4G", image], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
    subprocess.run(["mount", "-o", "loop", image, mount], check=True)
    for folder in ("spool", "files"):
        os.makedirs(os.path.join(mount, folder))


def create_rename(mount, thread, count):
    for i in range(count):
        part = f"{mount}/spool/{thread}-{i}.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, DATA)
        os.close(fd)
        os.rename(part, f"{mount}/files/{thread}-{i}")


def tmpfile_link(mount, thread, count):
    for i in range(count):
        fd = os.open(f"{mount}/spool", os.O_WRONLY | os.O_TMPFILE, 0o644)
        os.write(fd, DATA)
        # Python's os.link calls link(2), which does not follow /proc's magic link.
        source = f"/proc/self/fd/{fd}".encode()
        target = f"{mount}/files/{thread}-{i}".encode()
        if LIBC.linkat(AT_FDCWD, source, AT_FDCWD, target, AT_SYMLINK_FOLLOW) != 0:
            sys.exit(f"linkat: {os.strerror(ctypes.get_errno())}")
        os.close(fd)


def measure(method, mount, threads, files):
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.time()
    workers = [
        threading.Thread(target=method, args=(mount, thread, files // threads)) for thread in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.time() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, after.ru_stime - before.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", default="/var/tmp/dirops.img")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("dirops.py needs root (mkfs and a loop mount): run it with sudo")
    mount = tempfile.mkdtemp(prefix="upgate-dirops-")
    try:
        print(f"{args.files} files of 1 KiB from {args.threads} threads, a fresh ext4 per measurement")
        for round_number in range(1, args.rounds + 1):
            for method in (create_rename, tmpfile_link):
                fresh_filesystem(args.image, mount)
                wall, system = measure(method, mount, args.threads, args.files)
                name = method.__name__.replace("_", "+")
                print(
                    f"  round {round_number} {name:<14} wall {wall:5.2f} s"
                    f"   system CPU {system * 1e6 / args.files:5.1f} us/file"
                )
    finally:
        subprocess.run(["umount", mount], stderr=subprocess.DEVNULL, check=False)
        os.rmdir(mount)
        if os.path.exists(args.image):
            os.remove(args.image)


if __name__ == "__main__":
    main()
