/*
 * Dirty bitmaps through the C ABI: QEMU's block-dirty-bitmap-* commands
 * with QEMU's messages (recorded from qemu-storage-daemon 10), guest
 * writes marking bitmaps, busy bitmaps, merge, bitmap handles for a host
 * job that consumes a bitmap while the guest writes, and persistent
 * bitmaps in a qcow2 image made by qemu-img (stored when the context is
 * freed; left in-use, so inconsistent, when a process dies holding them).
 */
#include <pthread.h>
#include <sys/wait.h>

#include "util.h"

#define SIZE (64LL << 20)
#define G (BJ_ERROR_CLASS_GENERIC_ERROR)

static BjContext *ctx;

static void setup(void)
{
    char path[1024], small[1024], json[2048];
    BjError *err = NULL;
    ctx = new_ctx();
    make_image(path, sizeof(path), "bm.img", SIZE, 0);
    make_image(small, sizeof(small), "bm-small.img", SIZE / 2, 0);
    add_raw(ctx, "n0", path, NULL, 0, 0);
    add_raw(ctx, "small", small, NULL, 0, 0);
    /* A second node on n0's file, both written by a guest backend: two
     * writers that share nothing, which QEMU refuses (even in one process:
     * the locks belong to each open file), so this one does not lock. */
    (void)!snprintf(json, sizeof(json),
             "{\"driver\":\"raw\",\"node-name\":\"un\",\"discard\":\"unmap\",\"file\":"
             "{\"driver\":\"file\",\"filename\":\"%s\",\"locking\":\"off\"}}",
             path);
    CHECK(bj_blockdev_add(ctx, json, &err));
    CHECK(bj_blockdev_add(ctx, "{\"driver\":\"null-co\",\"node-name\":\"nul\",\"size\":1024}", &err));
    CHECK_NO_ERR(err);
}

static void check_query(const char *node, const char *want)
{
    BjError *err = NULL;
    char *q = bj_block_dirty_bitmap_query(ctx, node, &err);
    CHECK_NO_ERR(err);
    CHECK_STR(q, want);
    bj_free(q);
}

static void add_ok(const char *node, const char *name, int64_t g, bool disabled)
{
    BjError *err = NULL;
    CHECK(bj_block_dirty_bitmap_add(ctx, node, name, g, false, disabled, &err));
    CHECK_NO_ERR(err);
}

static void remove_ok(const char *node, const char *name)
{
    BjError *err = NULL;
    CHECK(bj_block_dirty_bitmap_remove(ctx, node, name, &err));
    CHECK_NO_ERR(err);
}

static void add_and_query(void)
{
    check_query("n0", "[]");
    add_ok("n0", "b0", 0, false);
    add_ok("n0", "dis", 4096, true);
    check_query("n0", "[{\"name\":\"dis\",\"recording\":false,\"persistent\":false,\"busy\":false,"
                      "\"granularity\":4096,\"count\":0},"
                      "{\"name\":\"b0\",\"recording\":true,\"persistent\":false,\"busy\":false,"
                      "\"granularity\":65536,\"count\":0}]");
    /* Names are per node. */
    add_ok("small", "b0", 512, false);
    add_ok("n0", "with space/and:colon", 1LL << 31, false);
    remove_ok("n0", "with space/and:colon");
    remove_ok("small", "b0");
    remove_ok("n0", "dis");
    remove_ok("n0", "b0");
    check_query("n0", "[]");
}

static void add_errors(void)
{
    BjError *err = NULL;
    char name[1100];
    static const int64_t bad[] = { 256, 1000, 3, 511, 65537 };
    size_t i;
    add_ok("n0", "b0", 0, false);
    CHECK(!bj_block_dirty_bitmap_add(ctx, "n0", "b0", 0, false, false, &err));
    CHECK_ERR(err, G, "Bitmap already exists: b0");
    CHECK(!bj_block_dirty_bitmap_add(ctx, "n0", "b0", 512, false, false, &err));
    CHECK_ERR(err, G, "Bitmap already exists: b0");
    CHECK(!bj_block_dirty_bitmap_add(ctx, "n0", "", 0, false, false, &err));
    CHECK_ERR(err, G, "Bitmap name cannot be empty");
    CHECK(!bj_block_dirty_bitmap_add(ctx, "nosuch", "x", 0, false, false, &err));
    CHECK_ERR(err, G, "Cannot find device='nosuch' nor node-name='nosuch'");
    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        CHECK(!bj_block_dirty_bitmap_add(ctx, "n0", "g", bad[i], false, false, &err));
        CHECK_ERR(err, G, "Granularity must be power of 2 and at least 512");
    }
    CHECK(!bj_block_dirty_bitmap_add(ctx, "n0", "g", -1, false, false, &err));
    CHECK_ERR(err, G, "Parameter 'granularity' expects uint32_t");
    CHECK(!bj_block_dirty_bitmap_add(ctx, "n0", "g", 1LL << 32, false, false, &err));
    CHECK_ERR(err, G, "Parameter 'granularity' expects uint32_t");
    CHECK(!bj_block_dirty_bitmap_add(ctx, "n0", "p", 0, true, false, &err));
    CHECK_ERR(err, G, "Can't store persistent bitmaps to n0: Operation not supported");
    memset(name, 'b', 1024);
    name[1024] = 0;
    {
        char want[1200];
        snprintf(want, sizeof(want), "Bitmap name too long: %s", name);
        CHECK(!bj_block_dirty_bitmap_add(ctx, "n0", name, 0, false, false, &err));
        CHECK_ERR(err, G, want);
    }
    name[1023] = 0;
    add_ok("n0", name, 0, false);
    remove_ok("n0", name);
    CHECK(!bj_block_dirty_bitmap_add(NULL, "n0", "x", 0, false, false, &err));
    CHECK_ERR(err, G, "Invalid argument: 'ctx' must not be NULL");
    CHECK(!bj_block_dirty_bitmap_add(ctx, NULL, "x", 0, false, false, &err));
    CHECK_ERR(err, G, "Invalid argument: 'node' must not be NULL");
    CHECK(!bj_block_dirty_bitmap_add(ctx, "n0", NULL, 0, false, false, &err));
    CHECK_ERR(err, G, "Invalid argument: 'name' must not be NULL");
    CHECK(!bj_block_dirty_bitmap_add(ctx, "n0", "\xff", 0, false, false, &err));
    CHECK_ERR(err, G, "Invalid argument: 'name' is not valid UTF-8");
    remove_ok("n0", "b0");
}

typedef bool (*Cmd)(BjContext *, const char *, const char *, BjError **);

static void lookup_errors(void)
{
    static const Cmd cmds[] = { bj_block_dirty_bitmap_remove, bj_block_dirty_bitmap_clear,
                                bj_block_dirty_bitmap_enable, bj_block_dirty_bitmap_disable };
    BjError *err = NULL;
    size_t i;
    add_ok("n0", "a", 0, false);
    for (i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        CHECK(!cmds[i](ctx, "n0", "x", &err));
        CHECK_ERR(err, G, "Dirty bitmap 'x' not found");
        CHECK(!cmds[i](ctx, "nosuch", "a", &err));
        CHECK_ERR(err, G, "Node 'nosuch' not found");
        CHECK(!cmds[i](ctx, "n0", "", &err));
        CHECK_ERR(err, G, "Dirty bitmap '' not found");
        CHECK(!cmds[i](ctx, "small", "a", &err));
        CHECK_ERR(err, G, "Dirty bitmap 'a' not found");
    }
    /* Idempotent enable/disable; clear of a disabled bitmap is fine. */
    CHECK(bj_block_dirty_bitmap_disable(ctx, "n0", "a", &err));
    CHECK(bj_block_dirty_bitmap_disable(ctx, "n0", "a", &err));
    CHECK(bj_block_dirty_bitmap_clear(ctx, "n0", "a", &err));
    CHECK(bj_block_dirty_bitmap_enable(ctx, "n0", "a", &err));
    CHECK(bj_block_dirty_bitmap_enable(ctx, "n0", "a", &err));
    CHECK_NO_ERR(err);
    remove_ok("n0", "a");
    CHECK(!bj_block_dirty_bitmap_remove(ctx, "n0", "a", &err));
    CHECK_ERR(err, G, "Dirty bitmap 'a' not found");
}

static void busy_bitmaps(void)
{
    static const Cmd cmds[] = { bj_block_dirty_bitmap_remove, bj_block_dirty_bitmap_clear,
                                bj_block_dirty_bitmap_enable, bj_block_dirty_bitmap_disable };
    static const char *busy = "Bitmap 'b0' is currently in use by another operation and cannot be used";
    BjError *err = NULL;
    BjBitmapRef src = { NULL, "b0" }, other = { NULL, "other" };
    size_t i;
    add_ok("n0", "b0", 0, false);
    add_ok("n0", "other", 0, false);
    CHECK(bj_block_dirty_bitmap_set_busy(ctx, "n0", "b0", true, &err));
    CHECK_NO_ERR(err);
    check_query("n0", "[{\"name\":\"other\",\"recording\":true,\"persistent\":false,\"busy\":false,"
                      "\"granularity\":65536,\"count\":0},"
                      "{\"name\":\"b0\",\"recording\":true,\"persistent\":false,\"busy\":true,"
                      "\"granularity\":65536,\"count\":0}]");
    for (i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        CHECK(!cmds[i](ctx, "n0", "b0", &err));
        CHECK_ERR(err, G, busy);
    }
    CHECK(!bj_block_dirty_bitmap_merge(ctx, "n0", "b0", &other, 1, &err));
    CHECK_ERR(err, G, busy);
    CHECK(!bj_block_dirty_bitmap_merge(ctx, "n0", "other", &src, 1, &err));
    CHECK_ERR(err, G, busy);
    CHECK(!bj_block_dirty_bitmap_add(ctx, "n0", "b0", 0, false, false, &err));
    CHECK_ERR(err, G, "Bitmap already exists: b0");
    CHECK(bj_block_dirty_bitmap_set_busy(ctx, "n0", "b0", false, &err));
    remove_ok("n0", "b0");
    remove_ok("n0", "other");
}

static BjBlockBackend *blk_on(const char *node)
{
    BjError *err = NULL;
    BjBlockBackend *b = bj_blk_new(ctx, node, NULL, &err);
    CHECK_NO_ERR(err);
    return b;
}

static int64_t count(const char *node, const char *name)
{
    BjError *err = NULL;
    BjDirtyBitmap *b = bj_block_dirty_bitmap_lookup(ctx, node, name, &err);
    int64_t c;
    CHECK_NO_ERR(err);
    c = bj_dirty_bitmap_count(b);
    bj_dirty_bitmap_unref(&b);
    CHECK(b == NULL);
    return c;
}

/* Count semantics recorded from QEMU: dirty granules x granularity;
 * write-zeroes counts; a discard counts only where discard=unmap; a
 * disabled bitmap records nothing. */
static void guest_writes_mark_bitmaps(void)
{
    static char buf[65536 + 2];
    BjBlockBackend *blk = blk_on("n0"), *ublk = blk_on("un");
    BjError *err = NULL;
    add_ok("n0", "g64", 0, false);
    add_ok("n0", "g4k", 4096, false);
    add_ok("n0", "g512", 512, false);
    add_ok("un", "u", 0, false);
    CHECK_INT(bj_blk_pwrite(blk, 0, buf, 4096, NULL, &err), 0);
    CHECK_INT(count("n0", "g64"), 65536);
    CHECK_INT(count("n0", "g4k"), 4096);
    CHECK_INT(count("n0", "g512"), 4096);
    CHECK_INT(bj_blk_pwrite(blk, 65535, buf, 2, NULL, &err), 0);
    CHECK_INT(count("n0", "g64"), 131072);
    CHECK_INT(count("n0", "g4k"), 4096 + 8192);
    CHECK_INT(count("n0", "g512"), 4096 + 1024);
    CHECK_INT(bj_blk_pwrite_zeroes(blk, 1 << 20, 128 << 10, false, NULL, &err), 0);
    CHECK_INT(count("n0", "g64"), 131072 + 131072);
    /* discard=ignore (the default): not counted. */
    CHECK_INT(bj_blk_pdiscard(blk, 2 << 20, 128 << 10, NULL, &err), 0);
    CHECK_INT(count("n0", "g64"), 262144);
    /* discard=unmap: counted, also a sub-granule one. */
    CHECK_INT(bj_blk_pdiscard(ublk, 1000, 1000, NULL, &err), 0);
    CHECK_INT(count("un", "u"), 65536);
    /* The last, partial granule counts whole. */
    CHECK_INT(bj_blk_pwrite(blk, SIZE - 100, buf, 100, NULL, &err), 0);
    CHECK_INT(count("n0", "g64"), 262144 + 65536);
    /* Disabled: nothing recorded; enabled again: only new writes. */
    CHECK(bj_block_dirty_bitmap_disable(ctx, "n0", "g64", &err));
    CHECK(bj_block_dirty_bitmap_clear(ctx, "n0", "g64", &err));
    CHECK_INT(bj_blk_pwrite(blk, 4 << 20, buf, 4096, NULL, &err), 0);
    CHECK_INT(count("n0", "g64"), 0);
    CHECK(bj_block_dirty_bitmap_enable(ctx, "n0", "g64", &err));
    CHECK_INT(bj_blk_pwrite(blk, 5 << 20, buf, 4096, NULL, &err), 0);
    CHECK_INT(count("n0", "g64"), 65536);
    CHECK_NO_ERR(err);
    remove_ok("n0", "g64");
    remove_ok("n0", "g4k");
    remove_ok("n0", "g512");
    remove_ok("un", "u");
    bj_blk_free(&blk);
    bj_blk_free(&ublk);
}

static void merge(void)
{
    static char buf[4096];
    BjBlockBackend *blk = blk_on("n0");
    BjError *err = NULL;
    BjBitmapRef two[2] = { { NULL, "a" }, { "n0", "b" } };
    BjBitmapRef bad[2] = { { NULL, "a" }, { NULL, "nosrc" } };
    BjBitmapRef other_node = { "small", "s" };
    BjBitmapRef no_node = { "nosuch", "o" };
    add_ok("n0", "a", 0, false);
    add_ok("n0", "b", 4096, false);
    add_ok("n0", "t", 0, true); /* a disabled target may be merged into */
    add_ok("small", "s", 0, false);
    CHECK_INT(bj_blk_pwrite(blk, 0, buf, sizeof(buf), NULL, &err), 0);
    CHECK(bj_block_dirty_bitmap_disable(ctx, "n0", "a", &err));
    CHECK_INT(bj_blk_pwrite(blk, 1 << 20, buf, sizeof(buf), NULL, &err), 0);
    CHECK(bj_block_dirty_bitmap_merge(ctx, "n0", "t", two, 2, &err));
    CHECK_NO_ERR(err);
    CHECK_INT(count("n0", "t"), 131072);
    /* Atomic: a missing source leaves the target alone. */
    CHECK(bj_block_dirty_bitmap_clear(ctx, "n0", "t", &err));
    CHECK(!bj_block_dirty_bitmap_merge(ctx, "n0", "t", bad, 2, &err));
    CHECK_ERR(err, G, "Dirty bitmap 'nosrc' not found");
    CHECK_INT(count("n0", "t"), 0);
    CHECK(!bj_block_dirty_bitmap_merge(ctx, "n0", "t", &other_node, 1, &err));
    CHECK_ERR(err, G, "Bitmaps are of different sizes (destination size is 67108864, source size "
                      "is 33554432) and can't be merged");
    CHECK(!bj_block_dirty_bitmap_merge(ctx, "n0", "t", &no_node, 1, &err));
    CHECK_ERR(err, G, "Node 'nosuch' not found");
    CHECK(!bj_block_dirty_bitmap_merge(ctx, "n0", "notarget", two, 1, &err));
    CHECK_ERR(err, G, "Dirty bitmap 'notarget' not found");
    CHECK(!bj_block_dirty_bitmap_merge(ctx, "n0", "t", NULL, 1, &err));
    CHECK_ERR(err, G, "Invalid argument: 'bitmaps' must not be NULL");
    /* An empty list merges nothing (QEMU 10.0 crashes on it). */
    CHECK(bj_block_dirty_bitmap_merge(ctx, "n0", "t", NULL, 0, &err));
    CHECK_NO_ERR(err);
    /* Into itself: no change. */
    CHECK(bj_block_dirty_bitmap_merge(ctx, "n0", "b", &two[1], 1, &err));
    CHECK_INT(count("n0", "b"), 8192);
    remove_ok("n0", "a");
    remove_ok("n0", "b");
    remove_ok("n0", "t");
    remove_ok("small", "s");
    bj_blk_free(&blk);
}

/* ---- a host consumer taking areas while the guest writes ------------- */

typedef struct {
    BjBlockBackend *blk;
    int done;
    unsigned char written[1024]; /* granules (64 KiB) of the first 64 MiB */
} Guest;

static void *guest_thread(void *arg)
{
    Guest *g = arg;
    static char buf[8192];
    unsigned x = 12345;
    int i;
    for (i = 0; i < 3000; i++) {
        int64_t off;
        x = x * 1103515245u + 12345u;
        off = (int64_t)(x % (SIZE - sizeof(buf)));
        CHECK_INT(bj_blk_pwrite(g->blk, off, buf, sizeof(buf), NULL, NULL), 0);
        g->written[off >> 16] = 1;
        g->written[(off + (int64_t)sizeof(buf) - 1) >> 16] = 1;
    }
    __atomic_store_n(&g->done, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

static void consumer_takes_while_guest_writes(void)
{
    static Guest g;
    static unsigned char taken[1024];
    BjError *err = NULL;
    BjDirtyBitmap *bm;
    pthread_t t;
    int64_t pos = 0, o, l, i;
    memset(&g, 0, sizeof(g));
    memset(taken, 0, sizeof(taken));
    g.blk = blk_on("n0");
    add_ok("n0", "m", 0, false);
    bm = bj_block_dirty_bitmap_lookup(ctx, "n0", "m", &err);
    CHECK_NO_ERR(err);
    CHECK(pthread_create(&t, NULL, guest_thread, &g) == 0);
    for (;;) {
        int finished = __atomic_load_n(&g.done, __ATOMIC_SEQ_CST);
        if (bj_dirty_bitmap_next_dirty_area(bm, pos, 1 << 20, true, &o, &l, &err)) {
            for (i = o >> 16; i < (o + l) >> 16; i++) {
                taken[i] = 1;
            }
            pos = o + l;
        } else if (pos > 0) {
            pos = 0;
        } else if (finished) {
            break;
        } else {
            sleep_ms(1); /* nothing dirty yet: let the guest write */
        }
        CHECK_NO_ERR(err);
    }
    CHECK(pthread_join(t, NULL) == 0);
    CHECK_INT(bj_dirty_bitmap_count(bm), 0);
    for (i = 0; i < 1024; i++) {
        if (g.written[i] && !taken[i]) {
            FAIL("granule %lld written but never taken", (long long)i);
        }
    }
    /* set / reset / peek on the handle. */
    CHECK(bj_dirty_bitmap_set(bm, 3 << 16, 1, &err));
    CHECK(bj_dirty_bitmap_next_dirty_area(bm, 0, 1 << 30, false, &o, &l, &err));
    CHECK_INT(o, 3 << 16);
    CHECK_INT(l, 1 << 16);
    CHECK_INT(bj_dirty_bitmap_count(bm), 1 << 16);
    CHECK(bj_dirty_bitmap_reset(bm, 0, SIZE, &err));
    CHECK(!bj_dirty_bitmap_next_dirty_area(bm, 0, 1 << 30, false, &o, &l, &err));
    CHECK_NO_ERR(err);
    CHECK(!bj_dirty_bitmap_set(bm, -1, 1, &err));
    CHECK_ERR(err, G, "Invalid argument: negative offset or length");
    CHECK(!bj_dirty_bitmap_next_dirty_area(bm, 0, 1, false, NULL, &l, &err));
    CHECK(err != NULL);
    bj_error_free(&err);
    CHECK_INT(bj_dirty_bitmap_count(NULL), -1);
    bj_dirty_bitmap_unref(&bm);
    /* The handle kept the bitmap; removal works as usual. */
    remove_ok("n0", "m");
    bj_blk_free(&g.blk);
}

static void bitmaps_go_with_their_node(void)
{
    BjError *err = NULL;
    BjDirtyBitmap *bm;
    char json[2048];
    char path[1024];
    make_image(path, sizeof(path), "bm-del.img", 1 << 20, 0);
    if (snprintf(json, sizeof(json), "{\"driver\":\"file\",\"node-name\":\"gone\",\"filename\":\"%s\"}",
                 path) >= (int)sizeof(json)) {
        FAIL("path too long");
    }
    CHECK(bj_blockdev_add(ctx, json, &err));
    add_ok("gone", "x", 0, false);
    bm = bj_block_dirty_bitmap_lookup(ctx, "gone", "x", &err);
    CHECK(bj_blockdev_del(ctx, "gone", &err));
    CHECK_NO_ERR(err);
    CHECK(!bj_block_dirty_bitmap_clear(ctx, "gone", "x", &err));
    CHECK_ERR(err, G, "Node 'gone' not found");
    /* A handle still works on the detached bitmap. */
    CHECK(bj_dirty_bitmap_set(bm, 0, 1, &err));
    CHECK_INT(bj_dirty_bitmap_count(bm), 65536);
    bj_dirty_bitmap_unref(&bm);
    CHECK(bj_blockdev_add(ctx, json, &err));
    check_query("gone", "[]");
    CHECK(bj_blockdev_del(ctx, "gone", &err));
    CHECK_NO_ERR(err);
}

/* ---- persistent bitmaps ------------------------------------------------ */

static char self_exe[1024];

static void sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    if (vsnprintf(cmd, sizeof(cmd), fmt, ap) >= (int)sizeof(cmd)) {
        FAIL("command too long");
    }
    va_end(ap);
    if (system(cmd) != 0) {
        FAIL("failed: %s", cmd);
    }
}

/* What `qemu-img info` says of `path` (JSON, -U: it may be open). */
static void image_info(const char *path, char *out, size_t len)
{
    char cmd[2048];
    size_t n;
    FILE *p;
    (void)!snprintf(cmd, sizeof(cmd), "qemu-img info -U --output=json %s", path);
    p = popen(cmd, "r");
    CHECK(p);
    n = fread(out, 1, len - 1, p);
    out[n] = 0;
    CHECK(pclose(p) == 0);
}

static BjContext *open_qcow2(const char *node, const char *path)
{
    BjError *err = NULL;
    char json[2048];
    BjContext *c = new_ctx();
    (void)!snprintf(json, sizeof(json),
                    "{\"driver\":\"qcow2\",\"node-name\":\"%s\",\"file\":"
                    "{\"driver\":\"file\",\"filename\":\"%s\"}}",
                    node, path);
    CHECK(bj_blockdev_add(c, json, &err));
    CHECK_NO_ERR(err);
    return c;
}

/* The child of persistent_bitmaps_in_qcow2: open the image, write, and
 * die without closing anything, as a killed process would. */
static int crash_child(const char *path)
{
    BjError *err = NULL;
    BjContext *c = open_qcow2("pq", path);
    BjBlockBackend *blk = bj_blk_new(c, "pq", NULL, &err);
    char buf[4096];
    CHECK_NO_ERR(err);
    memset(buf, 7, sizeof(buf));
    CHECK(bj_blk_pwrite(blk, 1 << 20, buf, sizeof(buf), NULL, &err) == 0);
    CHECK_NO_ERR(err);
    _exit(0);
}

static void check_qmp(BjContext *c, const char *cmd, const char *want)
{
    BjError *err = NULL;
    char *r = bj_qmp_execute(c, cmd, &err);
    CHECK_NO_ERR(err);
    CHECK_STR(r, want);
    bj_free(r);
}

static void persistent_bitmaps_in_qcow2(void)
{
    BjError *err = NULL;
    BjContext *c;
    char path[1024], info[16384];
    (void)!snprintf(path, sizeof(path), "%s/pb.qcow2", tmpdir());
    sh("qemu-img create -q -f qcow2 %s 4M && qemu-img bitmap --add %s from-qemu && "
       "qemu-io -c 'write 0 64k' %s >/dev/null",
       path, path, path);

    /* Loaded on open, bits and all (the hash QEMU gives: bit 0 set). */
    c = open_qcow2("pq", path);
    {
        char *q = bj_block_dirty_bitmap_query(c, "pq", &err);
        CHECK_NO_ERR(err);
        CHECK_STR(q, "[{\"name\":\"from-qemu\",\"recording\":true,\"persistent\":true,"
                     "\"busy\":false,\"granularity\":65536,\"count\":65536}]");
        bj_free(q);
    }
    check_qmp(c,
              "{\"execute\":\"x-debug-block-dirty-bitmap-sha256\","
              "\"arguments\":{\"node\":\"pq\",\"name\":\"from-qemu\"}}",
              "{\"return\":{\"sha256\":"
              "\"7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8\"}}");
    /* In use on disk while open. */
    image_info(path, info, sizeof(info));
    CHECK(strstr(info, "in-use"));

    CHECK(bj_block_dirty_bitmap_add(c, "pq", "mine", 512, true, true, &err));
    CHECK_NO_ERR(err);
    CHECK(!bj_block_dirty_bitmap_add(ctx, "n0", "mine", 0, true, false, &err));
    CHECK_ERR(err, G, "Can't store persistent bitmaps to n0: Operation not supported");
    /* Freeing the context closes the node: both are stored, not in use. */
    bj_context_free(&c);
    image_info(path, info, sizeof(info));
    CHECK(strstr(info, "\"name\": \"mine\""));
    CHECK(strstr(info, "\"name\": \"from-qemu\""));
    CHECK(!strstr(info, "in-use"));

    /* A process that dies with the image open leaves them in use. */
    sh("%s crash-child %s", self_exe, path);
    image_info(path, info, sizeof(info));
    CHECK(strstr(info, "in-use"));
    c = open_qcow2("pq", path);
    {
        char *q = bj_block_dirty_bitmap_query(c, "pq", &err);
        CHECK_NO_ERR(err);
        CHECK_STR(q, "[{\"name\":\"mine\",\"recording\":false,\"persistent\":true,"
                     "\"busy\":false,\"granularity\":512,\"count\":0,\"inconsistent\":true},"
                     "{\"name\":\"from-qemu\",\"recording\":false,\"persistent\":true,"
                     "\"busy\":false,\"granularity\":65536,\"count\":0,\"inconsistent\":true}]");
        bj_free(q);
    }
    CHECK(!bj_block_dirty_bitmap_clear(c, "pq", "mine", &err));
    CHECK_ERR(err, G, "Bitmap 'mine' is inconsistent and cannot be used");
    /* Removing one takes it out of the image at once. */
    CHECK(bj_block_dirty_bitmap_remove(c, "pq", "mine", &err));
    CHECK_NO_ERR(err);
    image_info(path, info, sizeof(info));
    CHECK(!strstr(info, "\"mine\""));
    bj_context_free(&c);
    sh("qemu-img check -q %s", path);
}

int main(int argc, char **argv)
{
    ssize_t n;
    if (argc == 3 && strcmp(argv[1], "crash-child") == 0) {
        return crash_child(argv[2]);
    }
    n = readlink("/proc/self/exe", self_exe, sizeof(self_exe) - 1);
    CHECK(n > 0);
    self_exe[n] = 0;
    setup();
    RUN(add_and_query);
    RUN(add_errors);
    RUN(lookup_errors);
    RUN(busy_bitmaps);
    RUN(guest_writes_mark_bitmaps);
    RUN(merge);
    RUN(consumer_takes_while_guest_writes);
    RUN(bitmaps_go_with_their_node);
    RUN(persistent_bitmaps_in_qcow2);
    bj_context_free(&ctx);
    return 0;
}
