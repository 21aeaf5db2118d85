#!/usr/bin/env python3
"""unionmount benchmark: native vs kernel overlayfs vs fuse-overlayfs vs unionmount.

Run through scripts/bench.sh (which installs the tools and builds the binary). Standard library
only. Needs root (mounts, drop_caches, trusted.* xattrs, mknod).

  1. builds (once, cached under $UNIONMOUNT_BENCH_DIR or /var/tmp/unionmount-bench) the dataset:
     base layer (debootstrap --variant=minbase + a 1 GiB file), python layer (~30k files), a
     modification layer (overrides, whiteouts, opaque dirs), a native merged copy, a 20k-file
     tarball, 500 small layers for the lookup-vs-depth test and a 100k-entry directory;
  2. checks that every driver shows the same merged tree as native (WRONG drivers are not timed);
  3. runs every workload, drivers interleaved, several repetitions;
  4. prints a markdown table of medians and ratios, and writes it plus the raw samples (JSON)
     to target/bench/.
"""
import argparse
import collections
import datetime
import fcntl
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tarfile
import time
import io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.environ.get("UNIONMOUNT_BENCH_DIR", "/var/tmp/unionmount-bench")
PYLIB_SRC = os.environ.get("UNIONMOUNT_BENCH_PYLIB", "/root/.pyenv/versions/3.11.7/lib/python3.11")
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("UNIONMOUNT_BENCH_MIRROR", "http://deb.debian.org/debian")

# Bump a component's version when its recipe changes; dependents rebuild too.
RECIPE = {
    "image": "1",       # docker-archives (gzip and plain) of base + python3 + app layers
    "base": "1",        # debootstrap minbase + big/1gib.bin
    "python": "1",      # usr/local/lib/python3.11 without __pycache__
    "mods": "1",        # overrides / whiteouts / opaque dirs
    "native": "1",      # cp -a of the kernel-overlay merged view
    "tarball": "1",     # 20k files
    "small": "1",       # 500 small layers
    "bigdir": "1",      # 100k-entry merged directory (two layers)
}
DEPS = {"mods": ["base", "python"], "native": ["base", "python", "mods"], "image": ["base"]}

# Extra -o options for unionmount (e.g. passthrough=all), shown in the table's header.
UM_OPTS = os.environ.get("UNIONMOUNT_BENCH_OPTS", "")
PY_REL = "usr/local/lib/python3.11"
BIG_REL = "big/1gib.bin"
DRIVERS = ["native", "kernel", "fuse-overlayfs", "unionmount"]
UNION_DRIVERS = ["kernel", "fuse-overlayfs", "unionmount"]
FUSE_DRIVERS = ["fuse-overlayfs", "unionmount"]
N_OVERRIDE_BASE, N_OVERRIDE_PY = 150, 350
N_DELETE_BASE, N_DELETE_PY = 100, 200
DELETED_DIRS = ["usr/share/doc", PY_REL + "/idlelib"]
OPAQUE_DIRS = ["usr/share/locale", PY_REL + "/lib2to3"]
N_COPYUP = 2000
N_CREATE = 20000
N_STAT = 2000
LAYER_SETS = [1, 16, 64, 128, 500]
BIGDIR_A = (0, 60000)
BIGDIR_B = (40000, 100000)


def log(*a):
    print("[bench %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    """Run a command (list or shell string), raise on failure."""
    kw.setdefault("check", True)
    if isinstance(cmd, str):
        kw.setdefault("shell", True)
        kw.setdefault("executable", "/bin/bash")
    return subprocess.run(cmd, **kw)


def run_group(cmd, cwd=None, capture=True):
    """Run a command in its own process group; on any interruption kill the whole group, so
    that nothing keeps a mount busy. Returns (rc, stdout, stderr)."""
    shell = isinstance(cmd, str)
    p = subprocess.Popen(cmd, cwd=cwd, shell=shell, executable="/bin/bash" if shell else None,
                         stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate()
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.wait()
        raise
    return p.returncode, (out or b"").decode(errors="replace"), err.decode(errors="replace")


def hkey(seed, s):
    return hashlib.sha1((seed + "\0" + s).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# mounts and cleanup


def mountinfo_under(prefix):
    """Mount points at or below prefix, deepest first."""
    out = []
    prefix = os.path.realpath(prefix)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            mp = mp.encode().decode("unicode_escape") if "\\" in mp else mp
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return sorted(set(out), key=lambda p: -p.count("/"))


def is_mounted(path):
    return os.path.realpath(path) in mountinfo_under(path)


def daemon_pids(mnt):
    """Pids of FUSE daemons whose command line names the mountpoint."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open("/proc/%s/comm" % d) as f:
                comm = f.read().strip()
            if comm not in ("fuse-overlayfs", "unionmount"):
                continue
            with open("/proc/%s/cmdline" % d, "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if mnt.encode() in args:
            pids.append(int(d))
    return pids


def proc_mem(pid):
    r = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":")
                r[k] = int(v.split()[0]) / 1024.0  # MiB
    return r


def umount(mnt, pids=None):
    if pids is None:
        pids = daemon_pids(mnt)
    for attempt in range(10):
        if not is_mounted(mnt):
            break
        r = subprocess.run(["umount", mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r.returncode == 0:
            break
        time.sleep(0.05 * (attempt + 1))
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait for the daemons to be gone, so that the next mount does not overlap them
    deadline = time.time() + 15
    for pid in pids:
        while os.path.exists("/proc/%d" % pid) and time.time() < deadline:
            try:
                with open("/proc/%d/stat" % pid) as f:
                    if f.read().split(")")[-1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.01)


def cleanup_all_mounts():
    for mp in mountinfo_under(BENCH_DIR):
        pids = daemon_pids(mp)
        subprocess.run(["umount", mp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if is_mounted(mp):
            subprocess.run(["umount", "-l", mp], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        for pid in pids:
            for _ in range(100):
                if not os.path.exists("/proc/%d" % pid):
                    break
                time.sleep(0.02)
    left = mountinfo_under(BENCH_DIR)
    if left:
        log("WARNING: mounts left behind:", left)
    return left


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# --------------------------------------------------------------------------------------------
# dataset


def P(*parts):
    return os.path.join(BENCH_DIR, *parts)


def stamp_value(name):
    v = {"recipe": RECIPE[name]}
    for d in DEPS.get(name, []):
        v["dep_" + d] = stamp_value(d)
    return v


def stamp_ok(name):
    try:
        with open(P("stamps", name + ".json")) as f:
            return json.load(f) == stamp_value(name)
    except (OSError, ValueError):
        return False


def write_stamp(name):
    os.makedirs(P("stamps"), exist_ok=True)
    with open(P("stamps", name + ".json.tmp"), "w") as f:
        json.dump(stamp_value(name), f)
    os.rename(P("stamps", name + ".json.tmp"), P("stamps", name + ".json"))


def rmtree(path):
    if os.path.lexists(path):
        left = mountinfo_under(path)
        if left:
            raise RuntimeError("refusing to remove %s: mounts below it: %s" % (path, left))
        sh(["rm", "-rf", "--one-file-system", path])


# ext4 without a journal (as on these VMs) skips inodes deleted in the last 5 s (300 s while
# their inode-table block is dirty) when it allocates, and that scan made any create-heavy
# row depend on what the previous driver had just deleted. So nothing is deleted between
# timed runs: old uppers and workload leftovers are renamed into run/trash, which is emptied
# (then synced, then left to age) only before and after the whole run, and a timed run that
# deletes (the delete row) is followed by the same pause.
TRASH_SEQ = [0]
INODE_AGE_S = 6.0


def discard(path):
    """Moves `path` out of the way without freeing its inodes (see above)."""
    if not os.path.lexists(path):
        return
    left = mountinfo_under(path)
    if left:
        raise RuntimeError("refusing to move %s: mounts below it: %s" % (path, left))
    trash = P("run", "trash")
    os.makedirs(trash, exist_ok=True)
    TRASH_SEQ[0] += 1
    os.rename(path, os.path.join(trash, "%d.%d" % (os.getpid(), TRASH_SEQ[0])))


def empty_trash():
    """Frees everything discarded, then waits until ext4 no longer skips those inodes."""
    trash = P("run", "trash")
    if os.path.lexists(trash):
        rmtree(trash)
    settle_deletes()


def settle_deletes():
    os.sync()
    time.sleep(INODE_AGE_S)


def invalidate(name):
    try:
        os.unlink(P("stamps", name + ".json"))
    except FileNotFoundError:
        pass


def walk_files(root):
    """Relative paths of every entry below root: {rel: lstat}."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            out[os.path.relpath(full, root)] = os.lstat(full)
    return out


def build_base():
    dst, tmp = P("layers", "base"), P("layers", "base.tmp")
    rmtree(tmp)
    os.makedirs(P("layers"), exist_ok=True)
    log("debootstrap --variant=minbase %s (once; ~1 min)" % DEBIAN_SUITE)
    try:
        sh(["debootstrap", "--variant=minbase", DEBIAN_SUITE, tmp, DEBIAN_MIRROR],
           stdout=subprocess.DEVNULL)
    finally:
        for mp in mountinfo_under(tmp):
            subprocess.run(["umount", "-l", mp])
    shutil.rmtree(os.path.join(tmp, "var/cache/apt/archives"), ignore_errors=True)
    os.makedirs(os.path.join(tmp, "var/cache/apt/archives/partial"), exist_ok=True)
    os.makedirs(os.path.join(tmp, "big"), exist_ok=True)
    log("writing the 1 GiB file")
    sh("head -c 1G /dev/urandom > %s" % os.path.join(tmp, BIG_REL))
    rmtree(dst)
    os.rename(tmp, dst)


def build_python():
    dst, tmp = P("layers", "python"), P("layers", "python.tmp")
    rmtree(tmp)
    if not os.path.isdir(PYLIB_SRC):
        raise SystemExit("python library %s not found (set UNIONMOUNT_BENCH_PYLIB)" % PYLIB_SRC)
    target = os.path.join(tmp, PY_REL)
    os.makedirs(target)
    log("copying %s (without __pycache__) into the python layer" % PYLIB_SRC)
    sh("tar -C %s --exclude=__pycache__ -cf - . | tar -C %s -xf -" % (PYLIB_SRC, target))
    n = sum(len(f) for _, _, f in os.walk(tmp))
    extra = sorted(d for d in os.listdir("/usr/lib") if d.startswith("python3"))
    for d in extra:  # top up to ~30k files when the interpreter's library is small
        if n >= 28000:
            break
        src = os.path.join("/usr/lib", d)
        t = os.path.join(tmp, "usr/lib", d)
        os.makedirs(t, exist_ok=True)
        sh("tar -C %s --exclude=__pycache__ -cf - . | tar -C %s -xf -" % (src, t))
        n = sum(len(f) for _, _, f in os.walk(tmp))
    log("python layer: %d files" % n)
    rmtree(dst)
    os.rename(tmp, dst)


def mirror_parents(rel, layers, top):
    """Create the parent directories of rel in top with the attributes of the lower copy."""
    parts = rel.split("/")[:-1]
    cur = ""
    for p in parts:
        cur = os.path.join(cur, p) if cur else p
        t = os.path.join(top, cur)
        if os.path.isdir(t):
            continue
        src = next(os.path.join(l, cur) for l in layers if os.path.isdir(os.path.join(l, cur)))
        st = os.lstat(src)
        os.mkdir(t)
        os.chown(t, st.st_uid, st.st_gid)
        os.chmod(t, stat.S_IMODE(st.st_mode))


def choose(files, seed, n, exclude_prefixes, exclude=()):
    def ok(rel):
        return rel not in exclude and not any(rel == p or rel.startswith(p + "/")
                                              for p in exclude_prefixes)
    cands = sorted((r for r in files if ok(r)), key=lambda r: hkey(seed, r))
    return sorted(cands[:n])


def delete_target():
    """The site-packages package whose tree is closest to 8000 entries."""
    sp = os.path.join(P("layers", "python"), PY_REL, "site-packages")
    best = None
    for d in sorted(os.listdir(sp)):
        full = os.path.join(sp, d)
        if not os.path.isdir(full) or os.path.islink(full):
            continue
        n = sum(len(a) + len(b) for _, a, b in os.walk(full))
        if best is None or abs(n - 8000) < abs(best[1] - 8000):
            best = (os.path.join(PY_REL, "site-packages", d), n)
    return best


def compile_targets():
    """Relative (to PY_REL) arguments for compileall: the standard library, no site-packages."""
    root = os.path.join(P("layers", "python"), PY_REL)
    out = []
    for n in sorted(os.listdir(root)):
        full = os.path.join(root, n)
        if n in ("site-packages", "idlelib"):
            continue
        if os.path.isdir(full) and not os.path.islink(full):
            out.append(n)
        elif n.endswith(".py"):
            out.append(n)
    return out


def regular_files(layer):
    return {r: st for r, st in walk_files(layer).items()
            if stat.S_ISREG(st.st_mode)}


def build_mods():
    base, py = P("layers", "base"), P("layers", "python")
    dst, tmp = P("layers", "mods"), P("layers", "mods.tmp")
    rmtree(tmp)
    os.makedirs(tmp)
    lowers = [py, base]
    base_files = regular_files(base)
    py_files = regular_files(py)
    dt = delete_target()[0]
    protected = ["big", "dev", "proc", "sys", dt] + DELETED_DIRS + OPAQUE_DIRS
    ov = (choose(base_files, "override", N_OVERRIDE_BASE, protected) +
          choose(py_files, "override", N_OVERRIDE_PY, protected))
    dl = (choose(base_files, "delete", N_DELETE_BASE, protected, set(ov)) +
          choose(py_files, "delete", N_DELETE_PY, protected, set(ov)))
    for rel in ov:
        src = os.path.join(py if rel in py_files else base, rel)
        mirror_parents(rel, lowers, tmp)
        t = os.path.join(tmp, rel)
        shutil.copy2(src, t)
        st = os.lstat(src)
        os.chown(t, st.st_uid, st.st_gid)
        with open(t, "ab") as f:
            f.write(b"\n# overridden by the benchmark's modification layer\n")
        shutil.copystat(src, t)
    for rel in dl + DELETED_DIRS:
        mirror_parents(rel, lowers, tmp)
        os.mknod(os.path.join(tmp, rel), stat.S_IFCHR | 0o000, os.makedev(0, 0))
    for rel in OPAQUE_DIRS:
        mirror_parents(rel + "/x", lowers, tmp)
        t = os.path.join(tmp, rel)
        os.setxattr(t, "trusted.overlay.opaque", b"y")
        for i in range(3):
            with open(os.path.join(t, "opaque-new-%d.txt" % i), "w") as f:
                f.write("new file %d in an opaque directory\n" % i)
    os.makedirs(os.path.join(tmp, "etc/bench-mods"))
    for i in range(20):
        with open(os.path.join(tmp, "etc/bench-mods/added-%02d.conf" % i), "w") as f:
            f.write("setting%d = %d\n" % (i, i))
    manifest = {"overrides": ov, "deletes": dl, "deleted_dirs": DELETED_DIRS,
                "opaque_dirs": OPAQUE_DIRS}
    with open(P("mods-manifest.json"), "w") as f:
        json.dump(manifest, f)
    rmtree(dst)
    os.rename(tmp, dst)
    log("mods layer: %d overrides, %d whiteouts, %d deleted dirs, %d opaque dirs"
        % (len(ov), len(dl), len(DELETED_DIRS), len(OPAQUE_DIRS)))


def main_lowers():
    return [P("layers", "mods"), P("layers", "python"), P("layers", "base")]


def build_native():
    dst, tmp = P("native"), P("native.tmp")
    rmtree(tmp)
    mnt = P("run", "native-build")
    os.makedirs(mnt, exist_ok=True)
    log("making the native merged copy (kernel overlay mount + cp -a)")
    sh(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + ":".join(main_lowers()), mnt])
    try:
        os.makedirs(tmp)
        sh(["cp", "-a", mnt + "/.", tmp + "/"])
    finally:
        umount(mnt)
    rmtree(dst)
    os.rename(tmp, dst)


def build_tarball():
    dst, tmp = P("create.tar"), P("create.tar.tmp")
    rng = random.Random(20000)
    blob = random.Random(1).randbytes(1 << 20)
    now = 1700000000
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:
        ndirs = N_CREATE // 100
        for d in range(ndirs):
            ti = tarfile.TarInfo("bench-create/d%03d" % d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, now
            tf.addfile(ti)
        for i in range(N_CREATE):
            size = min(int(rng.expovariate(1 / 3000.0)), 64 * 1024)
            off = rng.randrange(0, len(blob) - size)
            ti = tarfile.TarInfo("bench-create/d%03d/f%05d.dat" % (i % ndirs, i))
            ti.size, ti.mode, ti.mtime = size, 0o644, now
            tf.addfile(ti, io.BytesIO(blob[off:off + size]))
    os.rename(tmp, dst)


def build_small():
    dst, tmp = P("small"), P("small.tmp")
    rmtree(tmp)
    os.makedirs(tmp)
    for i in range(max(LAYER_SETS)):
        t = os.path.join(tmp, str(i), "t")
        os.makedirs(t)
        names = ["f%04d" % k for k in range(N_STAT)] if i == 0 else ["u%d_%d" % (i, k)
                                                                      for k in range(4)]
        for n in names:
            with open(os.path.join(t, n), "w") as f:
                f.write("layer %d file %s\n" % (i, n))
    rmtree(dst)
    os.rename(tmp, dst)


def build_bigdir():
    for name, (lo, hi) in (("bigdir_a", BIGDIR_A), ("bigdir_b", BIGDIR_B)):
        dst, tmp = P("layers", name), P("layers", name + ".tmp")
        rmtree(tmp)
        d = os.path.join(tmp, "d")
        os.makedirs(d)
        for i in range(lo, hi):
            os.close(os.open(os.path.join(d, "n%06d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
        rmtree(dst)
        os.rename(tmp, dst)


def build_image():
    """Three layers as tarballs and two docker-archives of them (legacy shape: manifest.json,
    <id>/layer.tar, config with rootfs.diff_ids): the Debian minbase layer (without the 1 GiB
    file), a layer adding the host's python3 with its standard library, and an app layer that
    deletes usr/share/doc and usr/share/man with `.wh.` entries. One archive has gzip layer
    blobs, the other plain tar."""
    import hashlib, tarfile
    dst, tmp = P("image"), P("image.tmp")
    rmtree(tmp)
    os.makedirs(tmp)
    py = os.path.join(tmp, "py")
    os.makedirs(os.path.join(py, "usr/bin"))
    os.makedirs(os.path.join(py, "usr/lib"))
    real = os.path.realpath("/usr/bin/python3")
    sh(["cp", "-a", real, os.path.join(py, "usr/bin/")])
    os.symlink(os.path.basename(real), os.path.join(py, "usr/bin/python3"))
    ver = os.path.basename(real)  # python3.11
    sh(["cp", "-a", "/usr/lib/" + ver, os.path.join(py, "usr/lib/")])
    sh("find %s -name __pycache__ -prune -exec rm -rf {} +" % py)
    app = os.path.join(tmp, "app")
    os.makedirs(os.path.join(app, "app"))
    os.makedirs(os.path.join(app, "usr/share"))
    with open(os.path.join(app, "app/main.py"), "w") as f:
        f.write("print('hello from the app')\n")
    for n in ("doc", "man"):
        open(os.path.join(app, "usr/share/.wh." + n), "w").close()
    layers = [("base", P("layers", "base"), ["--exclude=./big"]), ("python", py, []),
              ("app", app, [])]
    diff_ids, plain, gz = [], [], []
    for name, d, extra in layers:
        t = os.path.join(tmp, name + ".tar")
        sh(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", d, "-cf", t]
           + extra + ["."])
        h = hashlib.sha256()
        with open(t, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
        diff_ids.append("sha256:" + h.hexdigest())
        sh("gzip -6 -n -c %s > %s.gz" % (t, t))
        plain.append(t)
        gz.append(t + ".gz")
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/usr/bin/python3"]},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids},
                      "history": [{"created_by": "bench: %s layer" % n} for n, _, _ in layers]})
    cfg_name = hashlib.sha256(cfg.encode()).hexdigest() + ".json"
    for kind, files in (("gzip", gz), ("plain", plain)):
        out = os.path.join(tmp, "image-%s.tar" % kind)
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
            names = []
            for i, fpath in enumerate(files):
                arc = "%d/layer.tar" % i
                tf.add(fpath, arcname=arc)
                names.append(arc)
            for name, data in ((cfg_name, cfg.encode()), ("manifest.json", json.dumps(
                    [{"Config": cfg_name, "RepoTags": ["bench:latest"], "Layers": names}]).encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    for n in ("py", "app"):
        rmtree(os.path.join(tmp, n))
    rmtree(dst)
    os.rename(tmp, dst)


BUILDERS = [("base", build_base), ("python", build_python), ("mods", build_mods),
            ("native", build_native), ("tarball", build_tarball), ("small", build_small),
            ("bigdir", build_bigdir), ("image", build_image)]


def build_dataset():
    for name, fn in BUILDERS:
        if stamp_ok(name):
            continue
        t0 = time.time()
        log("building dataset component %r" % name)
        invalidate(name)
        fn()
        write_stamp(name)
        log("built %r in %.1fs" % (name, time.time() - t0))
    # derived choices (cheap): the workload file lists
    wl_path = P("workloads.json")
    wl_stamp = stamp_value("native")
    try:
        with open(wl_path) as f:
            wl = json.load(f)
        if wl.get("stamp") == wl_stamp:
            return wl
    except (OSError, ValueError):
        pass
    with open(P("mods-manifest.json")) as f:
        mods = json.load(f)
    dt, dt_n = delete_target()
    touched = set(mods["overrides"]) | set(mods["deletes"])
    protected = ["big", "dev", "proc", "sys", dt] + DELETED_DIRS + OPAQUE_DIRS
    small = {}
    for layer in (P("layers", "python"), P("layers", "base")):
        for r, st in regular_files(layer).items():
            if st.st_size <= (1 << 20):
                small[r] = st
    copyup = choose(small, "copyup", N_COPYUP, protected, touched)
    wl = {"stamp": wl_stamp, "delete_dir": dt, "delete_entries": dt_n, "copyup": copyup,
          "compile_args": compile_targets(), "mods": mods}
    with open(wl_path, "w") as f:
        json.dump(wl, f)
    return wl


# --------------------------------------------------------------------------------------------
# drivers


class Mount:
    """One union mount (or the native directory). Use as a context manager."""

    def __init__(self, bench, driver, lowers, rw=True, cwd=None, tag="m"):
        self.b, self.driver, self.lowers, self.rw, self.cwd = bench, driver, lowers, rw, cwd
        self.tag = tag
        self.mnt = P("run", "mnt")
        self.upper, self.work = P("run", "upper"), P("run", "work")
        self.mounted = False
        self.pids = []
        self.mount_time = None

    @property
    def root(self):
        return self.b.native_root if self.driver == "native" else self.mnt

    def _fresh_upper(self):
        for d in (self.upper, self.work):
            discard(d)
            os.makedirs(d)

    def mount(self, fresh=True):
        if self.driver == "native":
            return 0.0
        os.makedirs(self.mnt, exist_ok=True)
        if is_mounted(self.mnt):
            raise RuntimeError("%s is already mounted" % self.mnt)
        if self.rw and fresh:
            self._fresh_upper()
        opts = "lowerdir=" + ":".join(self.lowers)
        if self.rw:
            opts += ",upperdir=%s,workdir=%s" % (self.upper, self.work)
        if self.driver == "kernel":
            cmd = ["mount", "-t", "overlay", "overlay", "-o", opts, self.mnt]
        elif self.driver == "fuse-overlayfs":
            cmd = [self.b.fuse_overlayfs, "-o", opts, self.mnt]
        elif self.driver == "unionmount":
            cmd = [self.b.unionmount, "-o", opts + ("," + UM_OPTS if UM_OPTS else ""), self.mnt]
        else:
            raise ValueError(self.driver)
        parent_dev = os.stat(os.path.dirname(self.mnt)).st_dev
        logf = open(P("run", "%s.log" % self.driver), "ab")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=logf,
                           stderr=logf)
        self.mounted = True  # cleanup even when the command claims failure
        if r.returncode != 0:
            logf.close()
            raise RuntimeError("%s mount failed (rc %d), see %s"
                               % (self.driver, r.returncode, logf.name))
        while os.stat(self.mnt).st_dev == parent_dev:
            if time.perf_counter() - t0 > 20:
                raise RuntimeError("%s: mount not live after 20 s" % self.driver)
            time.sleep(0.0005)
        self.mount_time = time.perf_counter() - t0
        logf.close()
        if self.driver in FUSE_DRIVERS:
            self.pids = daemon_pids(self.mnt)
        return self.mount_time

    def umount(self):
        if self.driver == "native" or not self.mounted:
            return
        umount(self.mnt, self.pids)
        self.mounted = False
        if is_mounted(self.mnt):
            raise RuntimeError("could not unmount %s" % self.mnt)

    def remount(self):
        """Unmount and mount again on the same upper (cold daemon and kernel caches)."""
        if self.driver == "native":
            return
        self.umount()
        self.mount(fresh=False)

    def rss(self):
        if self.driver not in FUSE_DRIVERS:
            return None
        pids = [p for p in self.pids if os.path.exists("/proc/%d" % p)] or daemon_pids(self.mnt)
        if not pids:
            return None
        tot = {"VmHWM": 0.0, "VmRSS": 0.0}
        for p in pids:
            m = proc_mem(p)
            for k in tot:
                tot[k] += m.get(k, 0.0)
        return tot

    def __enter__(self):
        self.b.active.append(self)
        try:
            self.mount()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *a):
        try:
            self.umount()
        finally:
            if self in self.b.active:
                self.b.active.remove(self)
            if self.driver != "native" and not is_mounted(self.mnt):
                for d in (self.upper, self.work):
                    discard(d)


# --------------------------------------------------------------------------------------------
# correctness pre-check


def tree_signature(root, sample, big):
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in dirnames + sorted(filenames):
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            m = st.st_mode
            e = [stat.filemode(m), st.st_uid, st.st_gid]
            if stat.S_ISREG(m):
                e.append(st.st_size)
            elif stat.S_ISLNK(m):
                e.append(os.readlink(full))
            elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
                e.append("%d,%d" % (os.major(st.st_rdev), os.minor(st.st_rdev)))
            entries[rel] = e
    hashes = {}
    for rel in sample:
        full = os.path.join(root, rel)
        try:
            with open(full, "rb") as f:
                hashes[rel] = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            hashes[rel] = "error: %s" % e.strerror
    try:
        with open(os.path.join(root, big), "rb") as f:
            h = hashlib.sha256(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
            hashes[big + " (first+last MiB)"] = h.hexdigest()
    except OSError as e:
        hashes[big + " (first+last MiB)"] = "error: %s" % e.strerror
    return entries, hashes


def compare_sig(ref, got):
    diffs = []
    re_, rh = ref
    ge, gh = got
    for rel in sorted(set(re_) | set(ge)):
        a, b = re_.get(rel), ge.get(rel)
        if a != b:
            diffs.append("%s: native %s, driver %s" % (rel, a, b))
    for rel in sorted(rh):
        if rh[rel] != gh.get(rel):
            diffs.append("%s: content differs (%s vs %s)" % (rel, rh[rel][:12],
                                                             str(gh.get(rel))[:12]))
    return diffs


# --------------------------------------------------------------------------------------------
# the benchmark


def median(xs):
    return statistics.median(xs) if xs else None


# (key, label, unit, target kind, target value). kind: "ratio" (unionmount/kernel <= v),
# "abs" (unionmount median <= v), "self" (computed row), None.
ROWS = [
    ("mount", "mount latency (3 layers + upper)", "ms", "abs", 20.0),
    ("walk_cold", "metadata walk, cold (find -printf)", "s", "ratio", 1.3),
    ("walk_warm", "metadata walk, warm", "s", "ratio", 1.1),
    ("readall_cold", "read every small file, cold (tar | wc -c)", "s", "ratio", 1.2),
    ("readall_warm", "read every small file, warm", "s", "ratio", 1.2),
    ("seqread_cold", "sequential read 1 GiB, cold (dd bs=1M)", "s", "ratio", 1.05),
    ("seqread_warm", "sequential read 1 GiB, warm", "s", "ratio", 1.05),
    ("randread_cold", "4 KiB random read, cold (fio psync, 64 MiB)", "us/op", "ratio", 1.1),
    ("randread_warm", "4 KiB random read, warm (fio psync, 256 MiB)", "us/op", "ratio", 1.1),
    ("copyup", "copy-up: append 1 byte to 2000 lower files (+sync)", "s", "ratio", 1.0),
    ("create", "create: extract 20k-file tarball (+sync)", "s", "ratio", 1.3),
    ("delete", "delete: rm -rf lower dir (+sync)", "s", "ratio", 1.5),
    ("compileall", "build: python3 -m compileall stdlib (+sync)", "s", "ratio", 1.2),
]
for _n in LAYER_SETS:
    ROWS.append(("stat_hit_%d" % _n, "stat bottom-layer file, %d layers" % _n, "us/op",
                 None, None))
for _n in LAYER_SETS:
    ROWS.append(("stat_miss_%d" % _n, "stat missing name, %d layers" % _n, "us/op",
                 None, None))
ROWS += [
    ("stat_hit_scale", "stat bottom file: 500 vs 1 layer (own ratio)", "x", "self", 2.0),
    ("stat_miss_scale", "stat missing name: 500 vs 1 layer (own ratio)", "x", "self", 2.0),
    ("mount_500", "mount latency, 500 layers + upper", "ms", None, None),
    ("list100k", "list 100k-entry dir (find -printf, 2 layers)", "s", None, None),
    ("rss_walk", "daemon peak RSS after full walk (VmHWM)", "MiB", "abs", 64.0),
    ("rss_100k", "daemon peak RSS after 100k-entry dir (VmHWM)", "MiB", "abs", 128.0),
    ("img_first_gz", "image, gzip docker-archive, nothing cached: mount to first byte of "
     "python3 (native: gzip -d of its layers)", "s", "native", 1.0),
    ("img_first_tar", "same, against extracting it (native: tar -xzf of every layer)", "s",
     "native", 0.5),
    ("img_second_ready", "image, second mount (index cached): ready", "ms", "abs", 100.0),
    ("img_second_read", "image, second mount: first read of python3", "ms", "abs", 10.0),
    ("img_plain_ready", "image, uncompressed docker-archive, nothing cached: ready", "ms",
     "abs", 300.0),
    ("img_readall", "image: read every file (native: an extracted copy)", "s", "native", 1.5),
    ("img_readall_again", "image: read every file again (its bytes fetched and verified once)",
     "s", "native", 1.5),
]
ROW_BY_KEY = {r[0]: r for r in ROWS}
GROUP_ROWS = {
    "mount": ["mount"], "walk": ["walk_cold", "walk_warm", "rss_walk"],
    "readall": ["readall_cold", "readall_warm"], "seqread": ["seqread_cold", "seqread_warm"],
    "randread": ["randread_cold", "randread_warm"], "copyup": ["copyup"], "create": ["create"],
    "delete": ["delete"], "compileall": ["compileall"],
    "layers": [k for k in ROW_BY_KEY if k.startswith("stat_")] + ["mount_500"],
    "bigdir": ["list100k", "rss_100k"],
    "image": ["img_first_gz", "img_first_tar", "img_second_ready", "img_second_read",
              "img_plain_ready", "img_readall", "img_readall_again"],
}


class Bench:
    def __init__(self, args):
        self.args = args
        self.active = []
        self.samples = collections.defaultdict(lambda: collections.defaultdict(list))
        self.outputs = collections.defaultdict(dict)   # key -> driver -> output fingerprint
        self.wrong = {}          # driver -> list of differences (pre-check)
        self.row_wrong = collections.defaultdict(dict)  # key -> driver -> reason
        self.native_root = P("native")
        self.unionmount = os.environ.get("UNIONMOUNT_BIN",
                                         os.path.join(REPO, "target/release/unionmount"))
        self.fuse_overlayfs = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"

    # -- helpers
    def record(self, key, driver, value):
        self.samples[key][driver].append(value)

    def check_output(self, key, driver, out):
        """Every driver must produce the same output (e.g. line/byte counts)."""
        ref = self.outputs[key].setdefault(driver, out)
        if ref != out:
            self.row_wrong[key][driver] = "output changed between reps: %r vs %r" % (ref, out)
        base = self.outputs[key].get("native")
        if base is not None and driver != "native" and base != out:
            self.row_wrong[key][driver] = "output %r differs from native %r" % (out, base)

    def timed(self, cmd, cwd, capture=True):
        t0 = time.perf_counter()
        rc, out, err = run_group(cmd, cwd, capture)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError("command failed (rc %d): %s\n%s" % (rc, cmd, err[-2000:]))
        return dt, out.strip()

    def warm_paths(self, rels, roots):
        """Read files (page cache) from the native copy and the layers, untimed."""
        for root in roots:
            for rel in rels:
                p = os.path.join(root, rel)
                if os.path.isdir(p):
                    run_group("tar -cf - . | wc -c", p, capture=False)
                elif os.path.isfile(p):
                    with open(p, "rb") as f:
                        while f.read(1 << 20):
                            pass

    # -- pre-check
    def precheck(self, drivers):
        log("correctness pre-check: walking every driver's merged tree")
        with open(P("workloads.json")) as f:
            wl = json.load(f)
        ref_entries = walk_files(self.native_root)
        regs = sorted(r for r, st in ref_entries.items()
                      if stat.S_ISREG(st.st_mode) and st.st_size <= (8 << 20)
                      and not r.startswith("big/"))
        sample = sorted(regs, key=lambda r: hkey("sample", r))[:450]
        sample += [r for r in wl["mods"]["overrides"] if r in ref_entries][:50]
        ref = tree_signature(self.native_root, sample, BIG_REL)
        # the dataset recipe itself, checked on native (made from kernel overlayfs)
        problems = []
        for rel in wl["mods"]["deletes"] + wl["mods"]["deleted_dirs"]:
            if rel in ref[0]:
                problems.append("deleted path %s is visible" % rel)
        for d in wl["mods"]["opaque_dirs"]:
            names = sorted(os.listdir(os.path.join(self.native_root, d)))
            if names != ["opaque-new-%d.txt" % i for i in range(3)]:
                problems.append("opaque dir %s shows %s" % (d, names[:5]))
        for rel in wl["mods"]["overrides"][:50]:
            with open(os.path.join(P("layers", "mods"), rel), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != ref[1].get(rel):
                    problems.append("override %s not visible" % rel)
        if problems:
            raise SystemExit("dataset/native copy is inconsistent with its recipe:\n  " +
                             "\n  ".join(problems[:10]))
        self.tree_size = len(ref[0])
        log("native: %d entries" % len(ref[0]))
        for d in drivers:
            if d == "native":
                continue
            try:
                with Mount(self, d, main_lowers(), rw=True) as m:
                    got = tree_signature(m.root, sample, BIG_REL)
                diffs = compare_sig(ref, got)
            except Exception as e:
                diffs = ["mount/walk failed: %s" % e]
            if diffs:
                self.wrong[d] = diffs
                log("%s is WRONG (%d differences); first ones:" % (d, len(diffs)))
                for x in diffs[:8]:
                    log("   ", x)
            else:
                log("%s: merged tree identical to native (%d entries)" % (d, len(got[0])))

    # -- workloads (each for one driver, one rep)
    def w_mount(self, d):
        if d == "native":
            return
        for _ in range(3):
            with Mount(self, d, main_lowers()) as m:
                self.record("mount", d, m.mount_time * 1000)

    def w_walk(self, d):
        with Mount(self, d, main_lowers()) as m:
            m.remount()
            drop_caches()
            dt, out = self.timed("find . -printf '%s %m\\n' | wc -l", m.root)
            self.record("walk_cold", d, dt)
            self.check_output("walk", d, out)
            r = m.rss()
            if r:
                self.record("rss_walk", d, r["VmHWM"])
            dt, out = self.timed("find . -printf '%s %m\\n' | wc -l", m.root)
            self.record("walk_warm", d, dt)

    def w_readall(self, d):
        with Mount(self, d, main_lowers()) as m:
            m.remount()
            drop_caches()
            cmd = "tar --exclude=./big -cf - . | wc -c"
            dt, out = self.timed(cmd, m.root)
            self.record("readall_cold", d, dt)
            self.check_output("readall", d, out)
            dt, out = self.timed(cmd, m.root)
            self.record("readall_warm", d, dt)

    def host_warm_big(self, d):
        """On a VM the host caches the disk too: read the underlying 1 GiB file first, so that
        "cold" is guest-cold and host-warm for every driver alike (else it is bimodal)."""
        src = os.path.join(self.native_root if d == "native" else P("layers", "base"), BIG_REL)
        self.timed(["dd", "if=" + src, "of=/dev/null", "bs=1M", "status=none"], "/")

    def w_seqread(self, d):
        with Mount(self, d, main_lowers()) as m:
            self.host_warm_big(d)
            m.remount()
            drop_caches()
            cmd = ["dd", "if=" + os.path.join(m.root, BIG_REL), "of=/dev/null", "bs=1M",
                   "status=none"]
            dt, _ = self.timed(cmd, "/")
            self.record("seqread_cold", d, dt)
            dt, _ = self.timed(cmd, "/")
            self.record("seqread_warm", d, dt)

    def fio(self, path, io_size):
        cmd = ["fio", "--name=rr", "--filename=" + path, "--rw=randread", "--bs=4k",
               "--size=1g", "--io_size=" + io_size, "--ioengine=psync", "--direct=0",
               "--invalidate=0", "--readonly", "--randrepeat=1", "--randseed=4242",
               "--norandommap", "--output-format=json"]
        _, out = self.timed(cmd, "/")
        j = json.loads(out[out.index("{"):])
        iops = j["jobs"][0]["read"]["iops"]
        return 1e6 / iops

    def w_randread(self, d):
        with Mount(self, d, main_lowers()) as m:
            self.host_warm_big(d)
            m.remount()
            drop_caches()
            path = os.path.join(m.root, BIG_REL)
            self.record("randread_cold", d, self.fio(path, "64m"))
            self.timed(["dd", "if=" + path, "of=/dev/null", "bs=1M", "status=none"], "/")
            self.record("randread_warm", d, self.fio(path, "256m"))

    def w_copyup(self, d, wl):
        rels = wl["copyup"]
        roots = [self.native_root] if d == "native" else [P("layers", "python"),
                                                           P("layers", "base")]
        self.warm_paths(rels, roots)
        with Mount(self, d, main_lowers()) as m:
            sizes = [os.lstat(os.path.join(m.root, r)).st_size for r in rels]
            os.sync()
            t0 = time.perf_counter()
            for r in rels:
                fd = os.open(os.path.join(m.root, r), os.O_WRONLY | os.O_APPEND)
                os.write(fd, b"x")
                os.close(fd)
            os.sync()
            self.record("copyup", d, time.perf_counter() - t0)
            bad = [r for r, s in zip(rels, sizes)
                   if os.lstat(os.path.join(m.root, r)).st_size != s + 1]
            if bad:
                self.row_wrong["copyup"][d] = "%d files without the appended byte" % len(bad)
            if d == "native":
                for r, s in zip(rels, sizes):
                    os.truncate(os.path.join(m.root, r), s)

    def w_create(self, d):
        self.warm_paths(["create.tar"], [BENCH_DIR])
        with Mount(self, d, main_lowers()) as m:
            target = os.path.join(m.root, "opt")
            os.sync()
            dt, _ = self.timed("tar -xf %s && sync" % P("create.tar"), target, capture=False)
            self.record("create", d, dt)
            _, out = self.timed("find bench-create -type f | wc -l", target)
            self.check_output("create", d, out)
            if d == "native":
                discard(os.path.join(target, "bench-create"))

    def w_delete(self, d, wl):
        rel = wl["delete_dir"]
        roots = [self.native_root] if d == "native" else [P("layers", "python")]
        self.warm_paths([rel], roots)
        with Mount(self, d, main_lowers()) as m:
            os.sync()
            dt, _ = self.timed(["bash", "-c", 'rm -rf "$0" && sync', rel], m.root,
                               capture=False)
            self.record("delete", d, dt)
            if os.path.lexists(os.path.join(m.root, rel)):
                self.row_wrong["delete"][d] = "directory still there after rm -rf"
            if d == "native":
                sh(["cp", "-a", os.path.join(P("layers", "python"), rel),
                    os.path.join(m.root, rel)])
        settle_deletes()

    def w_compileall(self, d, wl):
        args = wl["compile_args"]
        rootrel = PY_REL
        roots = [os.path.join(self.native_root, rootrel)] if d == "native" else [
            os.path.join(P("layers", "mods"), rootrel), os.path.join(P("layers", "python"),
                                                                      rootrel)]
        self.warm_paths(args, roots)
        with Mount(self, d, main_lowers()) as m:
            cwd = os.path.join(m.root, rootrel)
            os.sync()
            t0 = time.perf_counter()
            run_group([PYTHON, "-m", "compileall", "-q"] + args, cwd, capture=False)
            os.sync()
            self.record("compileall", d, time.perf_counter() - t0)
            _, out = self.timed("find . -name '*.pyc' | wc -l", cwd)
            self.check_output("compileall", d, out)
            if d == "native":
                for dirpath, dirnames, _ in os.walk(cwd):
                    if "__pycache__" in dirnames:
                        dirnames.remove("__pycache__")
                        discard(os.path.join(dirpath, "__pycache__"))

    def w_layers(self, d, sets):
        hits = ["t/f%04d" % k for k in range(N_STAT)]
        misses = ["t/missing%04d" % k for k in range(N_STAT)]
        for n in sets:
            lowers = [str(i) for i in range(n - 1, -1, -1)]
            # the same warm state of the underlying file system for every driver: dentries of
            # the targets in the bottom layer and negative dentries of the misses in each layer
            for i in range(n):
                for name in (hits if i == 0 else []) + misses:
                    try:
                        os.stat(os.path.join(P("small", str(i)), name))
                    except FileNotFoundError:
                        pass
            if d == "native":
                root = P("small", "0")
                m = None
            else:
                m = Mount(self, d, lowers, rw=True, cwd=P("small"))
                m.__enter__()
                root = m.root
            try:
                if m is not None and n == 500:
                    self.record("mount_500", d, m.mount_time * 1000)
                os.stat(os.path.join(root, "t"))
                paths = [os.path.join(root, h) for h in hits]
                t0 = time.perf_counter()
                for p in paths:
                    os.stat(p)
                self.record("stat_hit_%d" % n, d, (time.perf_counter() - t0) / N_STAT * 1e6)
                paths = [os.path.join(root, h) for h in misses]
                nmiss = 0
                t0 = time.perf_counter()
                for p in paths:
                    try:
                        os.stat(p)
                    except FileNotFoundError:
                        nmiss += 1
                self.record("stat_miss_%d" % n, d, (time.perf_counter() - t0) / N_STAT * 1e6)
                if nmiss != N_STAT:
                    self.row_wrong["stat_miss_%d" % n][d] = "missing names found"
                if m is not None and len(os.listdir(os.path.join(root, "t"))) != N_STAT + 4 * (n - 1):
                    self.row_wrong["stat_hit_%d" % n][d] = "wrong listing of t/"
            finally:
                if m is not None:
                    m.__exit__(None, None, None)

    def w_image(self, d):
        """Container images (issue 4): only unionmount mounts them; the native column holds
        the baselines (gzip -d, tar -x, reading an extracted copy). Input files are warm in
        the page cache for every measurement alike."""
        if d not in ("native", "unionmount"):
            return
        img = P("image")
        layers = [os.path.join(img, n) for n in ("base.tar", "python.tar", "app.tar")]
        self.warm_paths(["image-gzip.tar", "image-plain.tar"] +
                        [os.path.basename(x) + ".gz" for x in layers] +
                        [os.path.basename(x) for x in layers], [img])
        mnt = P("run", "mnt")
        os.makedirs(mnt, exist_ok=True)
        if d == "native":
            dt, _ = self.timed("for f in %s; do gzip -dc $f.gz > /dev/null; done"
                               % " ".join(layers), "/")
            self.record("img_first_gz", d, dt)
            ex = P("run", "extracted")
            discard(ex)
            os.makedirs(ex)
            dt, _ = self.timed("for f in %s; do tar --numeric-owner -xpzf $f.gz; done"
                               % " ".join(layers), ex)
            # the app layer's .wh. entries mean deletions: apply them untimed
            sh("rm -rf usr/share/doc usr/share/man usr/share/.wh.doc usr/share/.wh.man", cwd=ex)
            self.record("img_first_tar", d, dt)
            sh("sync")
            dt, out = self.timed("tar -cf - . | wc -c", ex)
            self.record("img_readall", d, dt)
            dt, out = self.timed("tar -cf - . | wc -c", ex)
            self.record("img_readall_again", d, dt)
            discard(ex)
            return
        store = P("run", "store")
        bin_ = self.unionmount

        def mount(src):
            t0 = time.perf_counter()
            sh([bin_, "--image", src, "--store", store, mnt])
            return time.perf_counter() - t0

        def first_byte():
            t0 = time.perf_counter()
            with open(os.path.join(mnt, "usr/bin/python3"), "rb") as f:
                f.read(1)
            return time.perf_counter() - t0

        discard(store)
        try:
            t = mount("docker-archive:" + os.path.join(img, "image-gzip.tar"))
            t += first_byte()
            self.record("img_first_gz", d, t)
            self.record("img_first_tar", d, t)
            umount(mnt)
            t = mount("docker-archive:" + os.path.join(img, "image-gzip.tar"))
            self.record("img_second_ready", d, t * 1000)
            self.record("img_second_read", d, first_byte() * 1000)
            dt, out = self.timed("tar -cf - . | wc -c", mnt)
            self.record("img_readall", d, dt)
            dt, out = self.timed("tar -cf - . | wc -c", mnt)
            self.record("img_readall_again", d, dt)
            umount(mnt)
            discard(store)
            t = mount("docker-archive:" + os.path.join(img, "image-plain.tar"))
            self.record("img_plain_ready", d, t * 1000)
        finally:
            if is_mounted(mnt):
                umount(mnt)
            discard(store)

    def w_bigdir(self, d):
        if d == "native":
            return
        with Mount(self, d, [P("layers", "bigdir_b"), P("layers", "bigdir_a")]) as m:
            dt, out = self.timed("find d -printf '%s %m\\n' | wc -l", m.root)
            self.record("list100k", d, dt)
            if out != str(BIGDIR_B[1] - BIGDIR_A[0] + 1):
                self.row_wrong["list100k"][d] = "listed %s entries" % out
            r = m.rss()
            if r:
                self.record("rss_100k", d, r["VmHWM"])

    def run(self):
        a = self.args
        wl = build_dataset()
        drivers = a.drivers
        for d in drivers:
            if d not in DRIVERS:
                raise SystemExit("unknown driver %r (choose from %s)" % (d, ",".join(DRIVERS)))
        if "native" not in drivers:
            drivers = ["native"] + drivers  # the reference view
        self.drivers = drivers
        self.precheck(drivers)
        timed_drivers = [d for d in drivers if d not in self.wrong]
        sets = [n for n in LAYER_SETS if not (a.quick and n == 500)]
        if a.quick:
            for k in ("stat_hit_500", "stat_miss_500", "mount_500", "list100k", "rss_100k"):
                self.skipped.add(k)
        groups = [
            ("mount", lambda d: self.w_mount(d)),
            ("walk", lambda d: self.w_walk(d)),
            ("readall", lambda d: self.w_readall(d)),
            ("seqread", lambda d: self.w_seqread(d)),
            ("randread", lambda d: self.w_randread(d)),
            ("copyup", lambda d: self.w_copyup(d, wl)),
            ("create", lambda d: self.w_create(d)),
            ("delete", lambda d: self.w_delete(d, wl)),
            ("compileall", lambda d: self.w_compileall(d, wl)),
            ("layers", lambda d: self.w_layers(d, sets)),
            ("bigdir", lambda d: self.w_bigdir(d)),
            ("image", lambda d: self.w_image(d)),
        ]
        if a.quick:
            groups = [g for g in groups if g[0] != "bigdir"]
        if a.only:
            only = set(a.only)
            unknown = only - {g[0] for g in groups} - {"bigdir"}
            if unknown:
                raise SystemExit("unknown workload(s): %s (choose from %s)" % (
                    ",".join(sorted(unknown)), ",".join(g[0] for g in groups)))
            groups = [g for g in groups if g[0] in only]
        self.groups_run = [g[0] for g in groups]
        empty_trash()
        t_start = time.time()
        self.load_before = loadavg()
        busy = cpu_busy()
        if busy > 0.25:
            log("WARNING: the CPUs were %.0f%% busy before the run: something else is running"
                % (busy * 100))
        for rep in range(a.reps):
            order = timed_drivers[rep % len(timed_drivers):] + timed_drivers[:rep % len(
                timed_drivers)]
            log("rep %d/%d, driver order %s (load %.2f)" % (rep + 1, a.reps, ", ".join(order),
                                                          loadavg()[0]))
            for name, fn in groups:
                t0 = time.time()
                for d in order:
                    try:
                        fn(d)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:
                        log("ERROR %s on %s: %s" % (name, d, e))
                        for key in GROUP_ROWS[name]:
                            self.row_wrong[key][d] = "error: %s" % str(e)[:200]
                log("  %-10s %.1fs" % (name, time.time() - t0))
        self.elapsed = time.time() - t_start
        self.load_after = loadavg()

    # -- report
    def cell(self, key, d):
        if d in self.wrong:
            return "WRONG", None
        if d in self.row_wrong.get(key, {}):
            return ("ERROR" if self.row_wrong[key][d].startswith("error") else "WRONG"), None
        xs = self.samples.get(key, {}).get(d)
        if not xs:
            return "—", None
        v = median(xs)
        return fmt(v), v

    def table(self):
        ds = ["native", "kernel", "fuse-overlayfs", "unionmount"]
        head = ["workload", "unit"] + ds + ["fo/kernel", "um/kernel", "kernel/native",
                                            "fo/native", "um/native", "target", "result"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        shown = {k for g in getattr(self, "groups_run", GROUP_ROWS) for k in GROUP_ROWS[g]}
        for key, label, unit, kind, tv in ROWS:
            if key in self.skipped or key not in shown:
                continue
            vals, cells = {}, {}
            for d in ds:
                if d not in self.drivers:
                    cells[d] = "—"
                    continue
                cells[d], vals[d] = self.cell(key, d)
            if kind == "self":
                base = key.replace("_scale", "")
                for d in ds:
                    a_, b_ = (self.cell(base + "_500", d)[1], self.cell(base + "_1", d)[1])
                    if d == "native" or a_ is None or b_ is None:
                        cells[d], vals[d] = ("WRONG" if d in self.wrong else "—"), None
                    else:
                        vals[d] = a_ / b_
                        cells[d] = "%.2f" % vals[d]
            if all(c == "—" for c in cells.values()):
                continue

            def ratio(x, y):
                if kind == "self" or vals.get(x) is None or not vals.get(y):
                    return "—"
                return "%.2f" % (vals[x] / vals[y])
            um = vals.get("unionmount")
            if kind == "ratio":
                tstr = "um/kernel ≤ %g" % tv
                got = None if um is None or not vals.get("kernel") else um / vals["kernel"]
            elif kind == "abs":
                tstr = "≤ %g %s" % (tv, unit)
                got = um
            elif kind == "self":
                tstr = "um 500/1 ≤ %gx" % tv
                got = um
            elif kind == "native":
                tstr = "um/native ≤ %g" % tv
                got = None if um is None or not vals.get("native") else um / vals["native"]
            else:
                tstr, got = "", None
            if kind is None:
                res = ""
            elif cells.get("unionmount") in ("WRONG", "ERROR"):
                res = cells["unionmount"]
            elif got is None:
                res = "—"
            else:
                res = "PASS" if got <= tv else "MISS"
            row = [label, unit] + [cells[d] for d in ds] + [
                ratio("fuse-overlayfs", "kernel"), ratio("unionmount", "kernel"),
                ratio("kernel", "native"), ratio("fuse-overlayfs", "native"),
                ratio("unionmount", "native"), tstr, res]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)


def cpu_busy(seconds=1.0):
    """Fraction of all CPU time that was not idle over the next `seconds`."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]   # idle + iowait
    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def fmt(v):
    if v is None:
        return "—"
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    if v >= 1:
        return "%.2f" % v
    return "%.3f" % v


def git_rev():
    try:
        r = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "src"],
                               capture_output=True, text=True).stdout.strip()
        return r.stdout.strip() + ("+dirty(src)" if dirty else "")
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 reps, native/kernel/unionmount, no 500-layer and 100k-entry rows "
                    "(~3.5 minutes)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", default="", help="comma-separated workload groups: mount,walk,"
                    "readall,seqread,randread,copyup,create,delete,compileall,layers,bigdir,image")
    ap.add_argument("--drivers", default=None, help="comma-separated, default all four "
                    "(--quick: native,kernel,unionmount)")
    ap.add_argument("--build-only", action="store_true", help="build the dataset and stop")
    a = ap.parse_args()
    a.reps = a.reps or (2 if a.quick else 5)
    a.only = [x for x in a.only.split(",") if x]
    if a.drivers is None:
        a.drivers = "native,kernel,unionmount" if a.quick else ",".join(DRIVERS)
    a.drivers = [x for x in a.drivers.split(",") if x]
    if os.geteuid() != 0:
        raise SystemExit("the benchmark needs root (mounts, drop_caches, trusted xattrs)")
    os.makedirs(P("run"), exist_ok=True)
    lock = open(P(".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit("another benchmark is running on %s" % BENCH_DIR)

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    cleanup_all_mounts()  # from an earlier run that was killed hard
    b = Bench(a)
    b.skipped = set()
    try:
        if a.build_only:
            build_dataset()
            return
        b.run()
    except KeyboardInterrupt:
        log("interrupted; unmounting")
        cleanup_all_mounts()
        sys.exit(130)
    finally:
        for m in list(b.active):
            try:
                m.__exit__(None, None, None)
            except Exception:
                pass
        left = cleanup_all_mounts()
        if not left:
            for d in (P("run", "upper"), P("run", "work"), P("run", "trash")):
                shutil.rmtree(d, ignore_errors=True)
    ts = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = os.path.join(REPO, "target", "bench")
    os.makedirs(outdir, exist_ok=True)
    with open(P("workloads.json")) as f:
        wl = json.load(f)
    header = [
        "# unionmount benchmark %s" % ts,
        "",
        "unionmount %s (%s%s), fuse-overlayfs %s, kernel %s, %d CPUs, %d reps%s, medians; "
        "run took %.0f s; load average %.2f before, %.2f (5 min) after" % (
            git_rev(), b.unionmount, ", -o " + UM_OPTS if UM_OPTS else "", fo_version(b.fuse_overlayfs), platform.release(),
            os.cpu_count(), a.reps, " (quick)" if a.quick else "", b.elapsed,
            b.load_before[0], b.load_after[1]),
        "",
        "Dataset: %s — merged tree of %d entries (debootstrap minbase + 1 GiB file, python "
        "layer, modification layer); delete dir %s (%d entries); all mounts rw with an empty "
        "upper. Ratios are of medians; lower is better everywhere." % (
            BENCH_DIR, getattr(b, "tree_size", 0), wl["delete_dir"], wl["delete_entries"]),
        "",
    ]
    notes = []
    for d, diffs in b.wrong.items():
        notes.append("- **%s is WRONG** (merged tree differs from native, not timed): %s"
                     % (d, "; ".join(diffs[:5])))
    for key, per in sorted(b.row_wrong.items()):
        for d, why in per.items():
            notes.append("- %s / %s marked %s: %s" % (
                key, d, "ERROR" if why.startswith("error") else "WRONG", why))
    text = "\n".join(header) + b.table() + "\n" + ("\n" + "\n".join(notes) + "\n" if notes
                                                    else "")
    print(text)
    md = os.path.join(outdir, "results-%s.md" % ts)
    with open(md, "w") as f:
        f.write(text)
    raw = {"timestamp": ts, "args": vars(a), "unionmount": git_rev(),
           "kernel": platform.release(), "load_before": b.load_before,
           "load_after": b.load_after, "elapsed_s": b.elapsed, "samples": b.samples, "wrong": b.wrong,
           "row_wrong": b.row_wrong, "workloads": {k: v for k, v in wl.items()
                                                   if k not in ("copyup", "mods")}}
    with open(os.path.join(outdir, "results-%s.json" % ts), "w") as f:
        json.dump(raw, f, indent=1)
    log("wrote %s and .json" % md)


def fo_version(path):
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if "fuse-overlayfs" in line:
                return line.split()[-1]
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    main()
