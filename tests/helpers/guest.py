"""A real Linux guest for live tests and the demo: Debian's kernel (linux-image-amd64) and a
busybox-static initramfs whose init loads the virtio modules and runs a writer on every
virtio disk, forever.

The writer of disk D (/dev/vdX) keeps a sequence number s = 1, 2, 3, ... and for each s writes
one self-checking 4 KiB record into block b = s mod N of its disk (block b at byte
b * STRIDE: every record in a cluster of its own), synchronously (O_DIRECT when the
guest's dd can, then fsync), and only then prints `qe-writer D seq=s` on the serial console.
A disk therefore holds, at any moment, the records of 1..m for one m: block b holds
m - ((m - b) mod N) when that is >= 1, else nothing; m is at least the last sequence printed
(and at most one more). A writer that starts on a disk with records continues from the
largest one (a disk-only revert booted fresh); a guest restored with its memory continues
from the counter it had, which the disks at that snapshot hold.

The serial console lags the guest (the kernel's tty buffer and the emulated UART): a printed
sequence is on the disk, but the writer may be up to LAG writes further than the last line
that reached the serial file.

The power button (ACPI, as `machine stop` presses it) stops the writers, syncs and powers off.

`build()` makes the initramfs once (cached under /var/tmp by the kernel's version and this
file's text); `launch()` gives a machine launch definition that boots it; `Serial` reads what
the guest printed; `read_records`/`verify` read a disk image through qemu-img (the oracle)
and check it against a sequence.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import time

BLOCK = 4096
N = 32                      # records per disk
STRIDE = 64 * 1024          # bytes between records
LAG = 8                     # writes the serial console may lag behind a writer
MODULES = ("virtio_pci", "virtio_blk", "button", "evdev")
CACHE = "/var/tmp/qcow2engine-guest"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko 2>/dev/null; done
# the power button (any input device of that name), listened to from the start
for d in /sys/class/input/input*; do
    grep -q "Power Button" $d/name 2>/dev/null || continue
    for ev in $(ls $d | grep '^event'); do
        ( dd if=/dev/input/$ev bs=24 count=1 >/dev/null 2>&1; touch /tmp/button ) &
    done
done
arg() { v=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -1); echo "${v:-$2}"; }
N=$(arg qe.n 32); STRIDE=$(arg qe.stride 65536); DELAY=$(arg qe.delay 0)
SPB=$((STRIDE / 4096))
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
DIRECT=oflag=direct
dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null || DIRECT=

scan() {   # the largest valid sequence on $1, 0 if none
    best=0; b=0
    while [ $b -lt $N ]; do
        line=$(dd if=$1 bs=4096 skip=$((b * SPB)) count=1 2>/dev/null | head -c 200 | head -n 1)
        set -- $1 $line
        if [ "$2" = qe-writer ]; then
            body="$2 $3 $4 $5"; sum=${6#sum=}
            if [ "$(printf '%s' "$body" | md5sum | cut -c1-32)" = "$sum" ]; then
                s=${4#seq=}; [ $s -gt $best ] && best=$s
            fi
        fi
        set -- $1; b=$((b+1))
    done
    echo $best
}

writer() {  # $1 device, $2 name
    seq=$(scan $1)
    echo "qe-writer $2 start=$seq"
    while [ ! -e /tmp/stop ]; do
        seq=$((seq + 1)); b=$((seq % N))
        body="qe-writer $2 seq=$seq blk=$b"
        sum=$(printf '%s' "$body" | md5sum | cut -c1-32)
        printf '%s sum=%s\n' "$body" "$sum" | \
            dd of=$1 bs=4096 seek=$((b * SPB)) conv=sync,notrunc,fsync $DIRECT 2>/dev/null \
            || { echo "qe-writer $2 error seq=$seq"; sleep 1; seq=$((seq - 1)); continue; }
        echo "qe-writer $2 seq=$seq"
        [ "$DELAY" != 0 ] && sleep $DELAY
    done
    echo "qe-writer $2 stopped seq=$seq"
}

for d in /dev/vd?; do [ -b $d ] && writer $d ${d#/dev/} & done
echo "qe-guest up direct=${DIRECT:-no}"
while [ ! -e /tmp/button ]; do sleep 0.2; done
echo "qe-guest power button"
touch /tmp/stop
wait
sync
echo "qe-guest poweroff"
poweroff -f
"""

# ------------------------------------------------------------------ building


def kernel_release() -> str:
    """The newest installed Debian kernel (linux-image-amd64)."""
    ks = sorted(glob.glob("/boot/vmlinuz-*-amd64"))
    if not ks:
        raise RuntimeError("no Debian kernel in /boot: apt-get install linux-image-amd64 "
                           "(scripts/setup.sh --test does)")
    return os.path.basename(ks[-1])[len("vmlinuz-"):]


def _modules(release: str) -> list[str]:
    """The module files MODULES need, dependencies first (from modules.dep)."""
    root = "/lib/modules/%s" % release
    deps = {}
    with open(os.path.join(root, "modules.dep")) as f:
        for line in f:
            k, _, v = line.partition(":")
            deps[k.strip()] = v.split()
    by_name = {re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(k)).replace("-", "_"): k
               for k in deps}
    order: list[str] = []

    def add(path):
        for d in deps.get(path, []):
            add(d)
        if path not in order:
            order.append(path)
    for m in MODULES:
        if m not in by_name:
            raise RuntimeError("kernel %s has no module %s" % (release, m))
        add(by_name[m])
    return [os.path.join(root, p) for p in order]


def _ko_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        import lzma
        data = lzma.decompress(data)
    elif path.endswith(".zst"):
        import zstandard
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    elif path.endswith(".gz"):
        data = gzip.decompress(data)
    return data


def _cpio(entries) -> bytes:
    """A newc cpio archive of (name, mode, data) entries (data None for directories)."""
    out = io.BytesIO()
    ino = 1

    def pad(n):
        out.write(b"\0" * ((4 - n % 4) % 4))
    for name, mode, data in list(entries) + [("TRAILER!!!", 0, b"")]:
        nm = name.encode() + b"\0"
        data = data or b""
        hdr = "070701" + "".join("%08X" % v for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nm), 0))
        out.write(hdr.encode() + nm)
        pad(110 + len(nm))
        out.write(data)
        pad(len(data))
        ino += 1
    return out.getvalue()


def build(cache: str = CACHE) -> tuple[str, str]:
    """(kernel, initrd) paths: the installed Debian kernel and the writer initramfs (built
    once per kernel and init text, atomically)."""
    release = kernel_release()
    kernel = "/boot/vmlinuz-%s" % release
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise RuntimeError("no busybox: apt-get install busybox-static")
    tag = hashlib.sha1((release + INIT + repr(MODULES)).encode()).hexdigest()[:12]
    initrd = os.path.join(cache, "initrd-%s.cpio.gz" % tag)
    if os.path.exists(initrd):
        return kernel, initrd
    os.makedirs(cache, exist_ok=True)
    mods = _modules(release)
    names = [re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(p)) for p in mods]
    with open(busybox, "rb") as f:
        bb = f.read()
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries = [("bin", d, None), ("lib", d, None), ("lib/modules", d, None),
               ("bin/busybox", x, bb), ("init", x, INIT.encode()),
               ("modules.order", f, ("\n".join(names) + "\n").encode())]
    entries += [("lib/modules/%s.ko" % n, f, _ko_bytes(p)) for n, p in zip(names, mods)]
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".initrd")
    with os.fdopen(fd, "wb") as out:
        out.write(gzip.compress(_cpio(entries), 6))
    os.replace(tmp, initrd)
    return kernel, initrd


def launch(memory: str = "128M", accel: str = "tcg", delay: float = 0.0) -> dict:
    """A machine launch definition that boots the writer guest."""
    kernel, initrd = build()
    append = "console=ttyS0 quiet panic=-1 qe.n=%d qe.stride=%d qe.delay=%s" % (
        N, STRIDE, delay)
    return {"memory": memory, "accel": accel, "kernel": kernel, "initrd": initrd,
            "append": append, "qemu_args": ["-no-reboot"]}


# ------------------------------------------------------------------ the serial console

_LINE = re.compile(r"qe-writer (vd[a-z]) seq=(\d+)")
_START = re.compile(r"qe-writer (vd[a-z]) start=(\d+)")


class Serial:
    """What the guest printed on its serial console (the machine's serial file)."""

    def __init__(self, path: str):
        self.path = path

    def mark(self) -> int:
        """A position: what is printed after it is read with since=mark."""
        try:
            return os.path.getsize(self.path)
        except FileNotFoundError:
            return 0

    def text(self, since: int = 0) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(since)
                return f.read().decode("latin-1")
        except FileNotFoundError:
            return ""

    def seqs(self, since: int = 0) -> dict[str, list[int]]:
        """Per disk, the sequences printed after since, in order."""
        out: dict[str, list[int]] = {}
        for d, s in _LINE.findall(self.text(since)):
            out.setdefault(d, []).append(int(s))
        return out

    def starts(self, since: int = 0) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for d, s in _START.findall(self.text(since)):
            out.setdefault(d, []).append(int(s))
        return out

    def last(self, since: int = 0) -> dict[str, int]:
        return {d: v[-1] for d, v in self.seqs(since).items()}

    def wait(self, pred, timeout: float = 120.0, since: int = 0, what: str = "") -> None:
        """Until pred(text since) holds."""
        end = time.monotonic() + timeout
        while True:
            t = self.text(since)
            if pred(t):
                return
            if time.monotonic() > end:
                raise AssertionError("guest: timed out waiting for %s; serial since mark:\n%s"
                                     % (what or pred, t[-3000:]))
            time.sleep(0.1)

    def wait_seqs(self, disks, count: int = 1, timeout: float = 120.0, since: int = 0):
        """Until every disk printed count more sequences after since; the last ones."""
        self.wait(lambda t: all(len([1 for d, _ in _LINE.findall(t) if d == x]) >= count
                                for x in disks),
                  timeout, since, "%d writes on %s" % (count, ", ".join(disks)))
        return self.last(since)

    def wait_up(self, timeout: float = 180.0, since: int = 0) -> None:
        self.wait(lambda t: "qe-guest up" in t, timeout, since, "the guest to boot")


# ------------------------------------------------------------------ reading disks


def read_records(image: str, disk: str, snapshot: str | None = None) -> dict[int, int]:
    """block -> sequence of the valid records of disk's writer in image (its guest view as
    qemu-img reads it, with -U; snapshot: an internal snapshot's view).  A record whose
    checksum is wrong or that names another disk or block fails the assertion."""
    from tests.helpers.qemu import qemu_img
    with tempfile.TemporaryDirectory() as td:
        raw = os.path.join(td, "view.raw")
        args = ["convert", "-U", "-O", "raw"]
        if snapshot:
            args += ["-l", "snapshot.name=%s" % snapshot]
        qemu_img(*args, image, raw, check=True)
        out = {}
        with open(raw, "rb") as f:
            for b in range(N):
                rec = os.pread(f.fileno(), BLOCK, b * STRIDE)
                if not rec.strip(b"\0"):
                    continue
                line = rec.split(b"\n", 1)[0].decode("latin-1")
                m = re.fullmatch(r"(qe-writer (vd[a-z]) seq=(\d+) blk=(\d+)) sum=([0-9a-f]{32})",
                                 line)
                assert m, "%s block %d: not a writer record: %r" % (image, b, rec[:80])
                assert hashlib.md5(m.group(1).encode()).hexdigest() == m.group(5), \
                    "%s block %d: bad checksum %r" % (image, b, line)
                assert m.group(2) == disk and int(m.group(4)) == b, \
                    "%s block %d: record of %s block %s" % (image, b, m.group(2), m.group(4))
                assert int(m.group(3)) % N == b, "%s block %d: %r" % (image, b, line)
                assert rec[len(line) + 1:].strip(b"\0") == b"", \
                    "%s block %d: garbage after the record" % (image, b)
                out[b] = int(m.group(3))
    return out


def expected(m: int) -> dict[int, int]:
    """The records a disk holds after sequences 1..m."""
    return {b: m - ((m - b) % N) for b in range(N) if m - ((m - b) % N) >= 1}


def verify(image: str, disk: str, low: int = 0, high: int | None = None,
           snapshot: str | None = None) -> int:
    """Check that image holds disk's records of exactly 1..m for one m with low <= m <= high;
    return m."""
    recs = read_records(image, disk, snapshot)
    m = max(recs.values(), default=0)
    assert recs == expected(m), ("%s: records are not those of 1..%d" % (image, m),
                                 sorted(recs.items()))
    assert m >= low, "%s: holds 1..%d, the guest had reached %d" % (image, m, low)
    if high is not None:
        assert m <= high, "%s: holds 1..%d, more than the %d printed after" % (image, m, high)
    return m
