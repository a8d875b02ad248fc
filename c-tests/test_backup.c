/*
 * Backup and transactions through the C ABI: bj_blockdev_backup keeps the
 * target at the source's point in time while a guest writes; an
 * incremental backup from a bitmap copies only what the bitmap marks and
 * syncs it; QEMU's argument errors, and C's own (NULL, bad size, bad
 * enum); transactions built with BjActions: the nightly full backup with
 * a new bitmap at one point in time, an `abort` undoing a bitmap added
 * before it, grouped completion with a failing target cancelling the
 * other job, and an external snapshot.
 */
#include "util.h"

#define SIZE (4 << 20)
#define CL (64 << 10)
#define G (BJ_ERROR_CLASS_GENERIC_ERROR)

static char src_path[1024], tgt_path[1024], tgt2_path[1024], snap_path[1024];

/* src: 4 MiB of 0x5a; tgt, tgt2 sparse (tgt with one blkdebug rule when
 * `tgt_event` is set). */
static BjContext *setup(const char *tgt_event)
{
    BjContext *ctx = new_ctx();
    make_image(src_path, sizeof(src_path), "backup-src.img", SIZE, 0x5a);
    make_image(tgt_path, sizeof(tgt_path), "backup-tgt.img", SIZE, 0);
    make_image(tgt2_path, sizeof(tgt2_path), "backup-tgt2.img", SIZE, 0);
    add_raw(ctx, "src", src_path, NULL, 0, 0);
    add_raw(ctx, "tgt", tgt_path, tgt_event, EIO, 1);
    add_raw(ctx, "tgt2", tgt2_path, NULL, 0, 0);
    return ctx;
}

static void cleanup(void)
{
    unlink(src_path);
    unlink(tgt_path);
    unlink(tgt2_path);
}

static BjBackupOptions defaults(const char *id, const char *target)
{
    BjBackupOptions o;
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.job_id = id;
    o.device = "src";
    o.target = target;
    o.sync = BJ_MIRROR_SYNC_MODE_FULL;
    return o;
}

static void guest_write(BjBlockBackend *blk, long long off, int byte, size_t len)
{
    static char buf[SIZE];
    BjError *err = NULL;
    memset(buf, byte, len);
    CHECK_INT(bj_blk_pwrite(blk, off, buf, len, NULL, &err), 0);
    CHECK_NO_ERR(err);
}

static int64_t bitmap_count(BjContext *ctx, const char *name)
{
    BjError *err = NULL;
    BjDirtyBitmap *b = bj_block_dirty_bitmap_lookup(ctx, "src", name, &err);
    int64_t n;
    CHECK_NO_ERR(err);
    n = bj_dirty_bitmap_count(b);
    bj_dirty_bitmap_unref(&b);
    return n;
}

static void point_in_time_under_guest_writes(void)
{
    BjContext *ctx = setup(NULL);
    BjBackupOptions o = defaults("b0", "tgt");
    BjError *err = NULL;
    BjBlockBackend *blk = bj_blk_new(ctx, "src", NULL, &err);
    BjJob *job;
    Trace t = { "", 0 };
    CHECK_NO_ERR(err);
    o.speed = 1; /* one copy, then the job waits */
    o.filter_node_name = "cbw";
    job = bj_blockdev_backup(ctx, &o, &err);
    CHECK_NO_ERR(err);
    CHECK(job);
    guest_write(blk, 1 << 20, 0x11, CL + 100);
    guest_write(blk, 3 << 20, 0x22, 4096);
    CHECK(bj_block_job_set_speed(job, 0, &err));
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, "JSC:created JSC:running JSC:waiting JSC:pending COMPLETED "
                      "JSC:concluded JSC:null");
    /* Every byte of the target is the old source. */
    CHECK_INT(file_byte(tgt_path, 1 << 20), 0x5a);
    CHECK_INT(file_byte(tgt_path, (3 << 20) + 100), 0x5a);
    CHECK_INT(file_byte(tgt_path, SIZE - 1), 0x5a);
    CHECK_INT(file_byte(src_path, 1 << 20), 0x11);
    bj_job_unref(&job);
    bj_blk_free(&blk);
    bj_context_free(&ctx);
    cleanup();
}

static void incremental_copies_what_the_bitmap_marks(void)
{
    BjContext *ctx = setup(NULL);
    BjBackupOptions o = defaults("inc", "tgt");
    BjError *err = NULL;
    BjBlockBackend *blk;
    BjJob *job;
    CHECK(bj_block_dirty_bitmap_add(ctx, "src", "b0", 0, false, false, &err));
    CHECK_NO_ERR(err);
    blk = bj_blk_new(ctx, "src", NULL, &err);
    CHECK_NO_ERR(err);
    guest_write(blk, 0, 0x77, 512);
    guest_write(blk, 2 << 20, 0x78, 512);
    CHECK_INT(bitmap_count(ctx, "b0"), 2 * CL);
    o.sync = BJ_MIRROR_SYNC_MODE_INCREMENTAL;
    o.bitmap = "b0"; /* bitmap_mode 0: on-success */
    job = bj_blockdev_backup(ctx, &o, &err);
    CHECK_NO_ERR(err);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_NULL, 10000));
    CHECK_INT(bitmap_count(ctx, "b0"), 0);
    CHECK_INT(file_byte(tgt_path, 0), 0x77);
    CHECK_INT(file_byte(tgt_path, 2 << 20), 0x78);
    CHECK_INT(file_byte(tgt_path, 1 << 20), 0); /* not marked: not copied */
    bj_job_unref(&job);
    bj_blk_free(&blk);
    bj_context_free(&ctx);
    cleanup();
}

static void bad_arguments(void)
{
    BjContext *ctx = setup(NULL);
    BjBackupOptions o = defaults("j", "tgt");
    BjError *err = NULL;

    CHECK(bj_blockdev_backup(ctx, NULL, &err) == NULL);
    CHECK_ERR(err, G, "Invalid argument: 'opts' must not be NULL");
    o.size = 8;
    CHECK(bj_blockdev_backup(ctx, &o, &err) == NULL);
    CHECK(err && bj_error_get_errno(err) == EINVAL);
    bj_error_free(&err);
    o = defaults("j", "tgt");
    o.reserved[2] = 1;
    CHECK(bj_blockdev_backup(ctx, &o, &err) == NULL);
    CHECK_ERR(err, G, "Invalid argument: opts->reserved must be zero");
    o = defaults("j", "tgt");
    o.sync = 17;
    CHECK(bj_blockdev_backup(ctx, &o, &err) == NULL);
    CHECK_ERR(err, G, "Invalid argument: opts->sync 17 is out of range");
    o = defaults("j", "src");
    CHECK(bj_blockdev_backup(ctx, &o, &err) == NULL);
    CHECK_ERR(err, G, "Source and target cannot be the same");
    o = defaults("j", "tgt");
    o.sync = BJ_MIRROR_SYNC_MODE_BITMAP;
    CHECK(bj_blockdev_backup(ctx, &o, &err) == NULL);
    CHECK_ERR(err, G, "must provide a valid bitmap name for 'bitmap' sync mode");
    o = defaults("j", "tgt");
    o.max_chunk = 1000;
    CHECK(bj_blockdev_backup(ctx, &o, &err) == NULL);
    CHECK_ERR(err, G, "Required max-chunk (1000) is less than backup cluster size (65536)");
    o = defaults("j", "nosuch");
    CHECK(bj_blockdev_backup(ctx, &o, &err) == NULL);
    CHECK_ERR(err, G, "Cannot find device='nosuch' nor node-name='nosuch'");
    /* Nothing was left behind: the source still has only its own parents. */
    CHECK(bj_job_find(ctx, "j") == NULL);
    bj_context_free(&ctx);
    cleanup();
}

static void nightly_transaction_and_abort(void)
{
    BjContext *ctx = setup(NULL);
    BjBackupOptions o = defaults("full", "tgt");
    BjError *err = NULL;
    BjActions *a = bj_actions_new();
    BjBlockBackend *blk;
    BjJob *job;

    /* An abort after a bitmap add: nothing remains. */
    CHECK_INT(bj_actions_bitmap_add(a, "src", "b1", 0, false, false, &err), 0);
    CHECK_INT(bj_actions_abort(a, &err), 0);
    CHECK(!bj_transaction(ctx, a, BJ_ACTION_COMPLETION_MODE_INDIVIDUAL, &err));
    CHECK_ERR(err, G, "Transaction aborted using Abort action");
    CHECK(bj_block_dirty_bitmap_lookup(ctx, "src", "b1", &err) == NULL);
    CHECK_ERR(err, G, "Dirty bitmap 'b1' not found");
    bj_actions_free(&a);
    CHECK(a == NULL);

    /* The nightly full backup: a new bitmap and the backup at one point. */
    a = bj_actions_new();
    CHECK_INT(bj_actions_bitmap_add(a, "src", "b1", 0, false, false, &err), 0);
    CHECK_INT(bj_actions_backup(a, &o, &err), 0);
    CHECK(bj_transaction(ctx, a, BJ_ACTION_COMPLETION_MODE_INDIVIDUAL, &err));
    CHECK_NO_ERR(err);
    bj_actions_free(&a);
    job = bj_job_find(ctx, "full");
    if (job) {
        CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_NULL, 10000));
        bj_job_unref(&job);
    }
    CHECK(files_equal(src_path, tgt_path));
    CHECK_INT(bitmap_count(ctx, "b1"), 0);
    blk = bj_blk_new(ctx, "src", NULL, &err);
    CHECK_NO_ERR(err);
    guest_write(blk, 1 << 20, 0x44, 100);
    CHECK_INT(bitmap_count(ctx, "b1"), CL);
    bj_blk_free(&blk);

    /* Bad actions: C's own errors, and the list stays usable. */
    a = bj_actions_new();
    CHECK_INT(bj_actions_bitmap(a, "frobnicate", "src", "b1", &err), -EINVAL);
    CHECK_ERR(err, G, "Invalid argument: verb 'frobnicate' is not one of remove, clear, "
                      "enable, disable");
    CHECK_INT(bj_actions_bitmap(NULL, "clear", "src", "b1", &err), -EINVAL);
    CHECK_ERR(err, G, "Invalid argument: 'actions' must not be NULL");
    CHECK_INT(bj_actions_bitmap(a, "clear", "src", "b1", &err), 0);
    CHECK(!bj_transaction(ctx, a, 7, &err));
    CHECK_ERR(err, G, "Invalid argument: completion_mode 7 is out of range");
    CHECK(!bj_transaction(ctx, a, BJ_ACTION_COMPLETION_MODE_GROUPED, &err));
    CHECK_ERR(err, G, "Action 'block-dirty-bitmap-clear' does not support transaction "
                      "property completion-mode = grouped");
    CHECK(bj_transaction(ctx, a, BJ_ACTION_COMPLETION_MODE_INDIVIDUAL, &err));
    CHECK_NO_ERR(err);
    CHECK_INT(bitmap_count(ctx, "b1"), 0);
    bj_actions_free(&a);
    bj_context_free(&ctx);
    cleanup();
}

static void grouped_failure_cancels_the_other_job(void)
{
    BjContext *ctx = setup("write_aio");
    BjBackupOptions o1 = defaults("j1", "tgt2"), o2 = defaults("j2", "tgt");
    BjError *err = NULL;
    BjActions *a = bj_actions_new();
    Trace t = { "", 0 };
    o1.speed = 1;
    CHECK_INT(bj_actions_backup(a, &o1, &err), 0);
    CHECK_INT(bj_actions_backup(a, &o2, &err), 0);
    CHECK(bj_transaction(ctx, a, BJ_ACTION_COMPLETION_MODE_GROUPED, &err));
    CHECK_NO_ERR(err);
    bj_actions_free(&a);
    trace_until_null(ctx, &t);
    trace_until_null(ctx, &t);
    CHECK(strstr(t.text, "COMPLETED(Input/output error)") != NULL);
    CHECK(strstr(t.text, "CANCELLED") != NULL);
    CHECK(bj_job_find(ctx, "j1") == NULL);
    CHECK(bj_job_find(ctx, "j2") == NULL);
    bj_context_free(&ctx);
    cleanup();
}

static void snapshot_sync_puts_an_overlay_above(void)
{
    BjContext *ctx = setup(NULL);
    BjError *err = NULL;
    BjActions *a = bj_actions_new();
    BjBlockBackend *blk = bj_blk_new(ctx, "src", NULL, &err);
    CHECK_NO_ERR(err);
    snprintf(snap_path, sizeof(snap_path), "%s/backup-snap.qcow2", tmpdir());
    unlink(snap_path);
    CHECK_INT(bj_actions_snapshot_sync(a, "src", snap_path, "snap", NULL,
                                       BJ_NEW_IMAGE_MODE_ABSOLUTE_PATHS, &err),
              0);
    CHECK(bj_transaction(ctx, a, BJ_ACTION_COMPLETION_MODE_INDIVIDUAL, &err));
    CHECK_NO_ERR(err);
    bj_actions_free(&a);
    /* The guest now writes into the overlay; the source keeps its data. */
    guest_write(blk, 0, 0x66, 4096);
    CHECK_INT(bj_blk_flush(blk, NULL, &err), 0);
    CHECK_INT(file_byte(src_path, 0), 0x5a);
    bj_blk_free(&blk);
    bj_context_free(&ctx);
    unlink(snap_path);
    cleanup();
}

int main(void)
{
    RUN(point_in_time_under_guest_writes);
    RUN(incremental_copies_what_the_bitmap_marks);
    RUN(bad_arguments);
    RUN(nightly_transaction_and_abort);
    RUN(grouped_failure_cancels_the_other_job);
    RUN(snapshot_sync_puts_an_overlay_above);
    return 0;
}
