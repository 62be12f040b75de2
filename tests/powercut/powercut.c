/*
 * powercut.c: an LD_PRELOAD shim that journals every write that is not yet durable, so a test
 * can turn "the process was killed with -9" into "the machine lost power at that moment".
 *
 * kill -9 keeps the kernel's page cache: everything the process wrote is still there, synced
 * or not. A power cut keeps only what an fsync made durable. This shim records, for every file
 * under $POWERCUT_DIR, the pre-image of each change (the old bytes and the old size, read before
 * the write), each creation, unlink and rename (with a hard-linked backup of what they remove),
 * and a "synced" marker after each successful fsync/fdatasync of a file or directory. The
 * restore step (host/tests/support/powercut.rs) then undoes, newest first, every change that no
 * later sync covers:
 *   - a data change (write, pwrite, writev, ftruncate, O_TRUNC) is durable once its file
 *     (same device and inode) has been fsync'ed or fdatasync'ed after it;
 *   - a creation, unlink or rename is durable once its directory has been fsync'ed after it;
 *   - sync() and syncfs() make everything before them durable.
 * That is the worst case POSIX allows (every unsynced write dropped), not a random one.
 *
 * Files named `*-shm` (SQLite's WAL index) are mmapped, so their writes cannot be seen here;
 * they are not journaled and the restore step deletes them, as a power cut effectively does
 * (SQLite rebuilds the index from the WAL on open).
 *
 * The journal ($POWERCUT_JOURNAL, outside the directory) is written with plain write(2) calls
 * on an O_APPEND descriptor, one call per record, before the change it describes: kill -9 keeps
 * the page cache, so it survives the kill, and a record cut short by the kill is the last one
 * and described a change that never ran. One mutex serialises the journaled changes, so the
 * journal order is the order of the changes.
 *
 * link(2) and linkat(2) count as creations of the new name.
 *
 * Not handled (not used by SQLite or the gateway): dup'ed descriptors, mmap writes to other
 * files, fallocate, copy_file_range, truncate(2) by path, directories created or removed.
 *
 * Environment: POWERCUT_DIR (absolute path of the directory to watch), POWERCUT_JOURNAL
 * (absolute path of the journal file; backups are written beside it as <journal>.bak.<seq>),
 * and optionally POWERCUT_KILL_AT=N: the process SIGKILLs itself right after its N-th journaled
 * data change, so the cut lands between a write and its sync. SIGUSR2 does the same at the
 * POWERCUT_CUT_AFTER-th (default 1st) journaled data change after it arrives (the process must
 * not handle SIGUSR2 itself).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { K_WRITE = 1, K_CREATE = 2, K_UNLINK = 3, K_RENAME = 4, K_SYNC = 5, K_SYNCALL = 6 };

#define MAGIC 0x54554350u /* "PCUT" little-endian */

/* 112 bytes, all little-endian, no padding; mirrored in host/tests/support/powercut.rs. */
struct hdr {
    uint32_t magic, kind;
    uint64_t seq;
    uint64_t dev, ino;     /* WRITE/CREATE/UNLINK/RENAME: the file; SYNC: what was synced */
    uint64_t ddev, dino;   /* CREATE/UNLINK/RENAME: the directory of path 1 */
    uint64_t ddev2, dino2; /* RENAME: the directory of path 2 */
    int64_t offset;        /* WRITE: where the old bytes go back */
    int64_t old_size;      /* WRITE: the size before */
    uint64_t upto;         /* SYNC/SYNCALL: records with seq < upto are durable */
    uint64_t len1, len2, len3; /* path; old bytes or second path; backup path */
};

#define MAXFD 65536

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char *tracked[MAXFD]; /* path of each descriptor under the directory */
static char dir[PATH_MAX];
static size_t dirlen;
static char journal_path[PATH_MAX - 64];
static int journal = -1;
static uint64_t next_seq = 1;
static uint64_t writes_seen;   /* data changes journaled so far */
static uint64_t kill_at;       /* $POWERCUT_KILL_AT: SIGKILL right after this data change */
static volatile sig_atomic_t cut_next; /* set by SIGUSR2: SIGKILL after $POWERCUT_CUT_AFTER more */
static long cut_after = 1;

static void on_usr2(int sig) {
    (void)sig;
    cut_next = 1;
}

static int (*r_open)(const char *, int, ...);
static int (*r_open64)(const char *, int, ...);
static int (*r_openat)(int, const char *, int, ...);
static int (*r_openat64)(int, const char *, int, ...);
static int (*r_creat)(const char *, mode_t);
static int (*r_creat64)(const char *, mode_t);
static int (*r_close)(int);
static ssize_t (*r_write)(int, const void *, size_t);
static ssize_t (*r_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*r_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*r_writev)(int, const struct iovec *, int);
static ssize_t (*r_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*r_pwritev64)(int, const struct iovec *, int, off_t);
static ssize_t (*r_pwritev2)(int, const struct iovec *, int, off_t, int);
static int (*r_ftruncate)(int, off_t);
static int (*r_ftruncate64)(int, off_t);
static int (*r_fsync)(int);
static int (*r_fdatasync)(int);
static int (*r_syncfs)(int);
static void (*r_sync)(void);
static int (*r_unlink)(const char *);
static int (*r_unlinkat)(int, const char *, int);
static int (*r_link)(const char *, const char *);
static int (*r_linkat)(int, const char *, int, const char *, int);
static int (*r_rename)(const char *, const char *);
static int (*r_renameat)(int, const char *, int, const char *);
static int (*r_renameat2)(int, const char *, int, const char *, unsigned int);

#define RESOLVE(name) r_##name = dlsym(RTLD_NEXT, #name)

__attribute__((constructor)) static void init(void) {
    RESOLVE(open);
    RESOLVE(open64);
    RESOLVE(openat);
    RESOLVE(openat64);
    RESOLVE(creat);
    RESOLVE(creat64);
    RESOLVE(close);
    RESOLVE(write);
    RESOLVE(pwrite);
    RESOLVE(pwrite64);
    RESOLVE(writev);
    RESOLVE(pwritev);
    RESOLVE(pwritev64);
    RESOLVE(pwritev2);
    RESOLVE(ftruncate);
    RESOLVE(ftruncate64);
    RESOLVE(fsync);
    RESOLVE(fdatasync);
    RESOLVE(syncfs);
    RESOLVE(sync);
    RESOLVE(unlink);
    RESOLVE(unlinkat);
    RESOLVE(link);
    RESOLVE(linkat);
    RESOLVE(rename);
    RESOLVE(renameat);
    RESOLVE(renameat2);
    const char *d = getenv("POWERCUT_DIR");
    const char *j = getenv("POWERCUT_JOURNAL");
    if (!d || !j || d[0] != '/' || strlen(d) >= sizeof dir || strlen(j) >= sizeof journal_path)
        return;
    strcpy(dir, d);
    dirlen = strlen(dir);
    while (dirlen > 1 && dir[dirlen - 1] == '/')
        dir[--dirlen] = 0;
    strcpy(journal_path, j);
    const char *k = getenv("POWERCUT_KILL_AT");
    if (k)
        kill_at = strtoull(k, NULL, 10);
    const char *c = getenv("POWERCUT_CUT_AFTER");
    if (c && atol(c) > 0)
        cut_after = atol(c);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR2, &sa, NULL);
    journal = r_open(j, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (journal < 0) {
        static const char msg[] = "powercut: cannot open the journal\n";
        r_write(2, msg, sizeof msg - 1);
        abort();
    }
}

/* Absolute form of `path` relative to `dirfd` into out (no normalisation); 0 on success. */
static int absolute(int dirfd, const char *path, char *out) {
    if (!path)
        return -1;
    if (path[0] == '/') {
        if (strlen(path) >= PATH_MAX)
            return -1;
        strcpy(out, path);
        return 0;
    }
    char base[PATH_MAX];
    if (dirfd == AT_FDCWD) {
        if (!getcwd(base, sizeof base))
            return -1;
    } else {
        char link[64];
        snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        ssize_t n = readlink(link, base, sizeof base - 1);
        if (n < 0)
            return -1;
        base[n] = 0;
    }
    if (snprintf(out, PATH_MAX, "%s/%s", base, path) >= PATH_MAX)
        return -1;
    return 0;
}

static int watched(const char *abs) {
    return journal >= 0 && strncmp(abs, dir, dirlen) == 0 &&
           (abs[dirlen] == 0 || abs[dirlen] == '/');
}

static int is_shm(const char *abs) {
    size_t n = strlen(abs);
    return n >= 4 && strcmp(abs + n - 4, "-shm") == 0;
}

static int is_tracked(int fd) { return journal >= 0 && fd >= 0 && fd < MAXFD && tracked[fd]; }

/* The directory holding `abs`. */
static int parent_stat(const char *abs, struct stat *st) {
    char p[PATH_MAX];
    strcpy(p, abs);
    char *slash = strrchr(p, '/');
    if (!slash)
        return -1;
    if (slash == p)
        slash[1] = 0;
    else
        *slash = 0;
    return stat(p, st);
}

/* Appends one record (caller holds mu); returns its seq. */
static uint64_t append(struct hdr *h, const void *b1, const void *b2, const void *b3) {
    h->magic = MAGIC;
    h->seq = next_seq++;
    size_t total = sizeof *h + h->len1 + h->len2 + h->len3;
    char *buf = malloc(total);
    if (!buf)
        abort();
    memcpy(buf, h, sizeof *h);
    char *p = buf + sizeof *h;
    if (h->len1)
        memcpy(p, b1, h->len1);
    p += h->len1;
    if (h->len2)
        memcpy(p, b2, h->len2);
    p += h->len2;
    if (h->len3)
        memcpy(p, b3, h->len3);
    size_t done = 0;
    while (done < total) {
        ssize_t n = r_write(journal, buf + done, total - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            abort(); /* a journal that lies is worse than a crash */
        done += (size_t)n;
    }
    free(buf);
    return h->seq;
}

/* Reads [off, off+n) of the file behind fd, through a read-only descriptor if fd is
   write-only. */
static ssize_t read_old(int fd, void *buf, size_t n, off_t off) {
    ssize_t got = pread(fd, buf, n, off);
    if (got >= 0 || errno != EBADF)
        return got;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    int rfd = r_open(link, O_RDONLY | O_CLOEXEC);
    if (rfd < 0)
        return -1;
    got = pread(rfd, buf, n, off);
    r_close(rfd);
    return got;
}

/* Journals the pre-image of changing [off, off+n) of fd's file, or of cutting it to `off`
   when `cut` (caller holds mu). */
static void record_change(int fd, off_t off, size_t n, int cut) {
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        return;
    off_t old_size = st.st_size;
    size_t keep = 0;
    if (cut)
        keep = off < old_size ? (size_t)(old_size - off) : 0;
    else if (off < old_size)
        keep = (size_t)(old_size - off) < n ? (size_t)(old_size - off) : n;
    char *old = NULL;
    if (keep) {
        old = malloc(keep);
        if (!old)
            abort();
        size_t done = 0;
        while (done < keep) {
            ssize_t g = read_old(fd, old + done, keep - done, off + (off_t)done);
            if (g <= 0)
                abort();
            done += (size_t)g;
        }
    }
    struct hdr h = {0};
    h.kind = K_WRITE;
    h.dev = st.st_dev;
    h.ino = st.st_ino;
    h.offset = off;
    h.old_size = old_size;
    h.len1 = strlen(tracked[fd]);
    h.len2 = keep;
    append(&h, tracked[fd], old, NULL);
    free(old);
    writes_seen++;
}

/* After a data change (caller holds mu): the cut, if this is the change it is set at. The
   change is in the page cache and its sync has not begun, so the restore must drop it. */
static void maybe_cut(void) {
    if ((cut_next && --cut_after <= 0) || (kill_at && writes_seen >= kill_at))
        kill(getpid(), SIGKILL);
}

static off_t write_offset(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && (fl & O_APPEND)) {
        struct stat st;
        return fstat(fd, &st) == 0 ? st.st_size : 0;
    }
    return lseek(fd, 0, SEEK_CUR);
}

static size_t iov_total(const struct iovec *iov, int cnt) {
    size_t t = 0;
    for (int i = 0; i < cnt; i++)
        t += iov[i].iov_len;
    return t;
}

/* ---- opens ---------------------------------------------------------------------------- */

static int do_open(int dirfd, const char *path, int flags, mode_t mode,
                   int (*real)(int, const char *, int, mode_t)) {
    char abs[PATH_MAX];
    if (journal < 0 || absolute(dirfd, path, abs) != 0 || !watched(abs))
        return real(dirfd, path, flags, mode);
    pthread_mutex_lock(&mu);
    struct stat before;
    int existed = lstat(abs, &before) == 0;
    int shm = is_shm(abs);
    if (existed && !shm && S_ISREG(before.st_mode) && (flags & O_TRUNC) &&
        (flags & O_ACCMODE) != O_RDONLY && before.st_size > 0) {
        int rfd = r_open(abs, O_RDONLY | O_CLOEXEC);
        if (rfd >= 0 && rfd < MAXFD) {
            char *saved = tracked[rfd];
            tracked[rfd] = abs;
            record_change(rfd, 0, 0, 1);
            tracked[rfd] = saved;
            r_close(rfd);
        }
    }
    int fd = real(dirfd, path, flags, mode);
    if (fd >= 0) {
        struct stat st, dst;
        if (!existed && (flags & O_CREAT) && !shm && fstat(fd, &st) == 0 &&
            parent_stat(abs, &dst) == 0) {
            struct hdr h = {0};
            h.kind = K_CREATE;
            h.dev = st.st_dev;
            h.ino = st.st_ino;
            h.ddev = dst.st_dev;
            h.dino = dst.st_ino;
            h.len1 = strlen(abs);
            append(&h, abs, NULL, NULL);
        }
        if (!shm && fd < MAXFD) {
            free(tracked[fd]);
            tracked[fd] = strdup(abs);
        }
    }
    pthread_mutex_unlock(&mu);
    return fd;
}

static int via_open(int dirfd, const char *p, int f, mode_t m) {
    (void)dirfd;
    return r_open(p, f, m);
}
static int via_open64(int dirfd, const char *p, int f, mode_t m) {
    (void)dirfd;
    return r_open64(p, f, m);
}
static int via_openat(int dirfd, const char *p, int f, mode_t m) { return r_openat(dirfd, p, f, m); }
static int via_openat64(int dirfd, const char *p, int f, mode_t m) {
    return r_openat64(dirfd, p, f, m);
}
static int via_creat(int dirfd, const char *p, int f, mode_t m) {
    (void)dirfd;
    (void)f;
    return r_creat(p, m);
}
static int via_creat64(int dirfd, const char *p, int f, mode_t m) {
    (void)dirfd;
    (void)f;
    return r_creat64(p, m);
}

#define MODE_ARG(flags)                                                                       \
    mode_t mode = 0;                                                                          \
    if ((flags) & (O_CREAT | O_TMPFILE)) {                                                    \
        va_list ap;                                                                           \
        va_start(ap, flags);                                                                  \
        mode = va_arg(ap, mode_t);                                                            \
        va_end(ap);                                                                           \
    }

int open(const char *path, int flags, ...) {
    MODE_ARG(flags);
    return do_open(AT_FDCWD, path, flags, mode, via_open);
}
int open64(const char *path, int flags, ...) {
    MODE_ARG(flags);
    return do_open(AT_FDCWD, path, flags, mode, via_open64);
}
int openat(int dirfd, const char *path, int flags, ...) {
    MODE_ARG(flags);
    return do_open(dirfd, path, flags, mode, via_openat);
}
int openat64(int dirfd, const char *path, int flags, ...) {
    MODE_ARG(flags);
    return do_open(dirfd, path, flags, mode, via_openat64);
}
int creat(const char *path, mode_t mode) {
    return do_open(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, via_creat);
}
int creat64(const char *path, mode_t mode) {
    return do_open(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, via_creat64);
}

int close(int fd) {
    if (is_tracked(fd)) {
        pthread_mutex_lock(&mu);
        free(tracked[fd]);
        tracked[fd] = NULL;
        pthread_mutex_unlock(&mu);
    }
    return r_close(fd);
}

/* ---- writes --------------------------------------------------------------------------- */

ssize_t write(int fd, const void *buf, size_t n) {
    if (!is_tracked(fd) || n == 0)
        return r_write(fd, buf, n);
    pthread_mutex_lock(&mu);
    if (tracked[fd])
        record_change(fd, write_offset(fd), n, 0);
    ssize_t r = r_write(fd, buf, n);
    maybe_cut();
    pthread_mutex_unlock(&mu);
    return r;
}

#define PWRITE_LIKE(real, off, n, call)                                                       \
    if (!is_tracked(fd) || (n) == 0)                                                          \
        return call;                                                                          \
    pthread_mutex_lock(&mu);                                                                  \
    if (tracked[fd])                                                                          \
        record_change(fd, off, n, 0);                                                         \
    ssize_t r = call;                                                                         \
    maybe_cut();                                                                              \
    pthread_mutex_unlock(&mu);                                                                \
    return r;

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    PWRITE_LIKE(r_pwrite, off, n, r_pwrite(fd, buf, n, off));
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    PWRITE_LIKE(r_pwrite64, off, n, r_pwrite64(fd, buf, n, off));
}
ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    if (!is_tracked(fd))
        return r_writev(fd, iov, cnt);
    PWRITE_LIKE(r_writev, write_offset(fd), iov_total(iov, cnt), r_writev(fd, iov, cnt));
}
ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    PWRITE_LIKE(r_pwritev, off, iov_total(iov, cnt), r_pwritev(fd, iov, cnt, off));
}
ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) {
    PWRITE_LIKE(r_pwritev64, off, iov_total(iov, cnt), r_pwritev64(fd, iov, cnt, off));
}
ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    if (!is_tracked(fd))
        return r_pwritev2(fd, iov, cnt, off, flags);
    PWRITE_LIKE(r_pwritev2, off == -1 ? write_offset(fd) : off, iov_total(iov, cnt),
                r_pwritev2(fd, iov, cnt, off, flags));
}

int ftruncate(int fd, off_t len) {
    if (!is_tracked(fd))
        return r_ftruncate(fd, len);
    pthread_mutex_lock(&mu);
    if (tracked[fd])
        record_change(fd, len, 0, 1);
    int r = r_ftruncate(fd, len);
    maybe_cut();
    pthread_mutex_unlock(&mu);
    return r;
}
int ftruncate64(int fd, off_t len) {
    if (!is_tracked(fd))
        return r_ftruncate64(fd, len);
    pthread_mutex_lock(&mu);
    if (tracked[fd])
        record_change(fd, len, 0, 1);
    int r = r_ftruncate64(fd, len);
    maybe_cut();
    pthread_mutex_unlock(&mu);
    return r;
}

/* ---- syncs ---------------------------------------------------------------------------- */

/* The marker is written after the sync returns and covers only what was journaled before it
   began: a kill during the sync keeps nothing it was syncing. */
static int do_sync(int fd, int (*real)(int)) {
    if (!is_tracked(fd))
        return real(fd);
    pthread_mutex_lock(&mu);
    uint64_t upto = next_seq;
    pthread_mutex_unlock(&mu);
    int r = real(fd);
    struct stat st;
    if (r == 0 && fstat(fd, &st) == 0) {
        pthread_mutex_lock(&mu);
        struct hdr h = {0};
        h.kind = K_SYNC;
        h.dev = st.st_dev;
        h.ino = st.st_ino;
        h.upto = upto;
        append(&h, NULL, NULL, NULL);
        pthread_mutex_unlock(&mu);
    }
    return r;
}

int fsync(int fd) { return do_sync(fd, r_fsync); }
int fdatasync(int fd) { return do_sync(fd, r_fdatasync); }

static void sync_all_marker(uint64_t upto) {
    pthread_mutex_lock(&mu);
    struct hdr h = {0};
    h.kind = K_SYNCALL;
    h.upto = upto;
    append(&h, NULL, NULL, NULL);
    pthread_mutex_unlock(&mu);
}

int syncfs(int fd) {
    if (journal < 0)
        return r_syncfs(fd);
    pthread_mutex_lock(&mu);
    uint64_t upto = next_seq;
    pthread_mutex_unlock(&mu);
    int r = r_syncfs(fd);
    if (r == 0)
        sync_all_marker(upto);
    return r;
}

void sync(void) {
    if (journal < 0) {
        r_sync();
        return;
    }
    pthread_mutex_lock(&mu);
    uint64_t upto = next_seq;
    pthread_mutex_unlock(&mu);
    r_sync();
    sync_all_marker(upto);
}

/* ---- names ---------------------------------------------------------------------------- */

static void backup_name(char *out, uint64_t seq) {
    snprintf(out, PATH_MAX, "%s.bak.%llu", journal_path, (unsigned long long)seq);
}

static int do_unlink(int dirfd, const char *path, int flags) {
    char abs[PATH_MAX];
    struct stat st, dst;
    if (journal < 0 || (flags & AT_REMOVEDIR) || absolute(dirfd, path, abs) != 0 ||
        !watched(abs) || is_shm(abs) || lstat(abs, &st) != 0 || !S_ISREG(st.st_mode) ||
        parent_stat(abs, &dst) != 0)
        return r_unlinkat(dirfd, path, flags);
    pthread_mutex_lock(&mu);
    char bak[PATH_MAX];
    uint64_t seq = next_seq;
    backup_name(bak, seq);
    int linked = r_link(abs, bak) == 0;
    int r = r_unlinkat(dirfd, path, flags);
    if (r == 0 && linked) {
        struct hdr h = {0};
        h.kind = K_UNLINK;
        h.dev = st.st_dev;
        h.ino = st.st_ino;
        h.ddev = dst.st_dev;
        h.dino = dst.st_ino;
        h.len1 = strlen(abs);
        h.len3 = strlen(bak);
        append(&h, abs, NULL, bak);
    } else if (linked) {
        r_unlink(bak);
    }
    pthread_mutex_unlock(&mu);
    return r;
}

int unlink(const char *path) { return do_unlink(AT_FDCWD, path, 0); }
int unlinkat(int dirfd, const char *path, int flags) { return do_unlink(dirfd, path, flags); }

/* A new name for an existing file: a creation, durable once its directory is synced. */
static int do_link(int odir, const char *from, int ndir, const char *to, int flags) {
    char b[PATH_MAX];
    struct stat st, dst;
    if (journal < 0 || absolute(ndir, to, b) != 0 || !watched(b) || is_shm(b))
        return r_linkat(odir, from, ndir, to, flags);
    pthread_mutex_lock(&mu);
    int r = r_linkat(odir, from, ndir, to, flags);
    if (r == 0 && lstat(b, &st) == 0 && parent_stat(b, &dst) == 0) {
        struct hdr h = {0};
        h.kind = K_CREATE;
        h.dev = st.st_dev;
        h.ino = st.st_ino;
        h.ddev = dst.st_dev;
        h.dino = dst.st_ino;
        h.len1 = strlen(b);
        append(&h, b, NULL, NULL);
    }
    pthread_mutex_unlock(&mu);
    return r;
}

int link(const char *from, const char *to) { return do_link(AT_FDCWD, from, AT_FDCWD, to, 0); }
int linkat(int od, const char *from, int nd, const char *to, int flags) {
    return do_link(od, from, nd, to, flags);
}

static int do_rename(int odir, const char *from, int ndir, const char *to, unsigned int flags,
                     int (*real)(int, const char *, int, const char *, unsigned int)) {
    char a[PATH_MAX], b[PATH_MAX];
    struct stat st, d1, d2, target;
    if (journal < 0 || absolute(odir, from, a) != 0 || absolute(ndir, to, b) != 0 ||
        (!watched(a) && !watched(b)) || lstat(a, &st) != 0 || parent_stat(a, &d1) != 0 ||
        parent_stat(b, &d2) != 0)
        return real(odir, from, ndir, to, flags);
    pthread_mutex_lock(&mu);
    char bak[PATH_MAX];
    bak[0] = 0;
    if (lstat(b, &target) == 0 && S_ISREG(target.st_mode)) {
        backup_name(bak, next_seq);
        if (r_link(b, bak) != 0)
            bak[0] = 0;
    }
    int r = real(odir, from, ndir, to, flags);
    if (r == 0) {
        struct hdr h = {0};
        h.kind = K_RENAME;
        h.dev = st.st_dev;
        h.ino = st.st_ino;
        h.ddev = d1.st_dev;
        h.dino = d1.st_ino;
        h.ddev2 = d2.st_dev;
        h.dino2 = d2.st_ino;
        h.len1 = strlen(a);
        h.len2 = strlen(b);
        h.len3 = strlen(bak);
        append(&h, a, b, bak);
    } else if (bak[0]) {
        r_unlink(bak);
    }
    pthread_mutex_unlock(&mu);
    return r;
}

static int via_rename(int od, const char *f, int nd, const char *t, unsigned int fl) {
    (void)od;
    (void)nd;
    (void)fl;
    return r_rename(f, t);
}
static int via_renameat(int od, const char *f, int nd, const char *t, unsigned int fl) {
    (void)fl;
    return r_renameat(od, f, nd, t);
}
static int via_renameat2(int od, const char *f, int nd, const char *t, unsigned int fl) {
    return r_renameat2(od, f, nd, t, fl);
}

int rename(const char *from, const char *to) {
    return do_rename(AT_FDCWD, from, AT_FDCWD, to, 0, via_rename);
}
int renameat(int od, const char *from, int nd, const char *to) {
    return do_rename(od, from, nd, to, 0, via_renameat);
}
int renameat2(int od, const char *from, int nd, const char *to, unsigned int flags) {
    return do_rename(od, from, nd, to, flags, via_renameat2);
}
