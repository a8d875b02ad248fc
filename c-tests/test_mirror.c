/*
 * The mirror job through the C ABI (bj_blockdev_mirror): the lifecycles
 * and error cases of ../shared/spec/traces (recorded from
 * qemu-storage-daemon 10.0.2 on 4 MiB raw images filled with 0x5a) event
 * for event, pivot of a guest backend on complete, QEMU's argument
 * errors, and guest writes during a write-blocking mirror.
 */
#include <pthread.h>

#include "util.h"

#define SIZE (4 << 20)
#define G (BJ_ERROR_CLASS_GENERIC_ERROR)

/* Event summaries of the golden traces (their "event_summary"). */
#define GOLDEN_COMPLETE                                                        \
    "JSC:created JSC:running JSC:ready READY JSC:waiting JSC:pending "         \
    "COMPLETED JSC:concluded JSC:null"
#define GOLDEN_FORCE_CANCEL_AFTER_READY                                        \
    "JSC:created JSC:running JSC:ready READY JSC:aborting CANCELLED "          \
    "JSC:concluded JSC:null"
#define GOLDEN_SRC_READ_EIO_IGNORE_ONCE                                        \
    "JSC:created JSC:running ERR(read,ignore) JSC:ready READY JSC:waiting "    \
    "JSC:pending COMPLETED JSC:concluded JSC:null"
#define GOLDEN_SRC_READ_EIO_REPORT                                             \
    "JSC:created JSC:running ERR(read,report) ERR(read,report) "               \
    "ERR(read,report) ERR(read,report) JSC:aborting "                          \
    "COMPLETED(Input/output error) JSC:concluded JSC:null"
#define GOLDEN_TGT_WRITE_ENOSPC_STOP                                           \
    "JSC:created JSC:running ERR(write,stop) JSC:paused JSC:running "          \
    "JSC:ready READY JSC:waiting JSC:pending COMPLETED JSC:concluded JSC:null"

static char src_path[1024], tgt_path[1024];

/* A fresh context with src (0x5a) and a sparse tgt of SIZE bytes; either
 * side may get one blkdebug rule. */
static BjContext *setup(const char *src_event, const char *tgt_event, int err_no, int once)
{
    BjContext *ctx = new_ctx();
    make_image(src_path, sizeof(src_path), "mirror-src.img", SIZE, 0x5a);
    make_image(tgt_path, sizeof(tgt_path), "mirror-tgt.img", SIZE, 0);
    add_raw(ctx, "src", src_path, src_event, err_no, once);
    add_raw(ctx, "tgt", tgt_path, tgt_event, err_no, once);
    return ctx;
}

static BjMirrorOptions defaults(void)
{
    BjMirrorOptions o;
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.job_id = "job0";
    o.device = "src";
    o.target = "tgt";
    o.sync = BJ_MIRROR_SYNC_MODE_FULL;
    return o;
}

static BjJob *start(BjContext *ctx, const BjMirrorOptions *o)
{
    BjError *err = NULL;
    BjJob *job = bj_blockdev_mirror(ctx, o, &err);
    CHECK_NO_ERR(err);
    CHECK(job);
    return job;
}

static void complete_pivots_the_guest(void)
{
    BjContext *ctx = setup(NULL, NULL, 0, 0);
    BjMirrorOptions o = defaults();
    BjBlockBackendOptions bo;
    BjBlockBackend *blk;
    BjError *err = NULL;
    BjJob *job;
    Trace t = { "", 0 };
    char buf[4096];

    memset(&bo, 0, sizeof(bo));
    bo.size = sizeof(bo);
    bo.name = "vda";
    blk = bj_blk_new(ctx, "src", &bo, &err);
    CHECK_NO_ERR(err);
    job = start(ctx, &o);
    trace_until_ready(ctx, &t);
    /* A guest write after READY reaches the target before the pivot. */
    memset(buf, 0xa5, sizeof(buf));
    CHECK_INT(bj_blk_pwrite(blk, 1 << 20, buf, sizeof(buf), NULL, &err), 0);
    CHECK_NO_ERR(err);
    CHECK(bj_job_complete(job, &err));
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, GOLDEN_COMPLETE);
    CHECK(files_equal(src_path, tgt_path));
    /* After the pivot the guest writes to the target only. */
    memset(buf, 0x33, sizeof(buf));
    CHECK_INT(bj_blk_pwrite(blk, 0, buf, sizeof(buf), NULL, &err), 0);
    CHECK_NO_ERR(err);
    CHECK_INT(bj_blk_flush(blk, NULL, &err), 0);
    CHECK_INT(file_byte(tgt_path, 0), 0x33);
    CHECK_INT(file_byte(src_path, 0), 0x5a);
    CHECK_INT(file_byte(tgt_path, 1 << 20), 0xa5);
    bj_job_unref(&job);
    bj_blk_free(&blk);
    bj_context_free(&ctx);
}

/* Both ends raw over O_DIRECT files with aio=io_uring: the copies go on
 * the run's io_uring ring (a reaper thread waits in io_uring_enter only
 * while requests are in the kernel, which valgrind must get through); the
 * events are the golden trace's and the target is the source. */
static void complete_on_io_uring_nodes(void)
{
    BjContext *ctx = new_ctx();
    BjMirrorOptions o = defaults();
    BjError *err = NULL;
    BjJob *job;
    Trace t = { "", 0 };
    char json[2048];
    const char *names[2] = { "src", "tgt" };
    const char *paths[2] = { src_path, tgt_path };
    int i;

    make_image(src_path, sizeof(src_path), "mirror-src.img", SIZE, 0x5a);
    make_image(tgt_path, sizeof(tgt_path), "mirror-tgt.img", SIZE, 0);
    for (i = 0; i < 2; i++) {
        int n = snprintf(json, sizeof(json),
                         "{\"driver\":\"raw\",\"node-name\":\"%s\",\"file\":{"
                         "\"driver\":\"file\",\"filename\":\"%s\",\"aio\":\"io_uring\","
                         "\"cache\":{\"direct\":true}}}",
                         names[i], paths[i]);
        CHECK(n < (int)sizeof(json));
        CHECK(bj_blockdev_add(ctx, json, &err));
        CHECK_NO_ERR(err);
    }
    o.granularity = 65536;
    job = start(ctx, &o);
    trace_until_ready(ctx, &t);
    CHECK(bj_job_complete(job, &err));
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, GOLDEN_COMPLETE);
    bj_job_unref(&job);
    bj_context_free(&ctx);
    CHECK(files_equal(src_path, tgt_path));
}

static void soft_cancel_after_ready_completes_without_pivot(void)
{
    BjContext *ctx = setup(NULL, NULL, 0, 0);
    BjMirrorOptions o = defaults();
    BjBlockBackend *blk;
    BjError *err = NULL;
    BjJob *job;
    Trace t = { "", 0 };
    char buf[512];

    blk = bj_blk_new(ctx, "src", NULL, &err);
    CHECK_NO_ERR(err);
    job = start(ctx, &o);
    trace_until_ready(ctx, &t);
    CHECK(bj_job_user_cancel(job, false, &err));
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    /* QEMU: a soft cancel after READY is a success without pivot. */
    CHECK_STR(t.text, GOLDEN_COMPLETE);
    CHECK(files_equal(src_path, tgt_path));
    memset(buf, 0x11, sizeof(buf));
    CHECK_INT(bj_blk_pwrite(blk, 0, buf, sizeof(buf), NULL, &err), 0);
    CHECK_INT(bj_blk_flush(blk, NULL, &err), 0);
    CHECK_NO_ERR(err);
    CHECK_INT(file_byte(src_path, 0), 0x11);
    CHECK_INT(file_byte(tgt_path, 0), 0x5a);
    bj_job_unref(&job);
    bj_blk_free(&blk);
    bj_context_free(&ctx);
}

static void force_cancel_after_ready(void)
{
    BjContext *ctx = setup(NULL, NULL, 0, 0);
    BjMirrorOptions o = defaults();
    BjError *err = NULL;
    BjJob *job = start(ctx, &o);
    Trace t = { "", 0 };

    trace_until_ready(ctx, &t);
    CHECK(bj_job_user_cancel(job, true, &err));
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, GOLDEN_FORCE_CANCEL_AFTER_READY);
    bj_job_unref(&job);
    bj_context_free(&ctx);
}

static void source_read_error_ignored_once(void)
{
    BjContext *ctx = setup("read_aio", NULL, EIO, 1);
    BjMirrorOptions o = defaults();
    BjError *err = NULL;
    BjJob *job;
    Trace t = { "", 0 };

    o.on_source_error = BJ_BLOCKDEV_ON_ERROR_IGNORE;
    job = start(ctx, &o);
    trace_until_ready(ctx, &t);
    CHECK(bj_job_complete(job, &err));
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, GOLDEN_SRC_READ_EIO_IGNORE_ONCE);
    /* The failed range was dirtied again and copied later. */
    CHECK(files_equal(src_path, tgt_path));
    bj_job_unref(&job);
    bj_context_free(&ctx);
}

static void source_read_error_reported(void)
{
    BjContext *ctx = setup("read_aio", NULL, EIO, 0);
    BjMirrorOptions o = defaults();
    BjBlockJobInfo *info;
    BjError *err = NULL;
    Trace t = { "", 0 };
    BjJob *job;

    /* auto-dismiss off, to look at the concluded job. */
    o.manual_dismiss = true;
    job = start(ctx, &o);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_CONCLUDED, 10000));
    info = bj_block_job_query(job, &err);
    CHECK_NO_ERR(err);
    CHECK_STR(info->error, "Input/output error");
    CHECK_INT(info->io_status, BJ_BLOCK_DEVICE_IO_STATUS_OK);
    bj_block_job_info_free(&info);
    CHECK(bj_job_dismiss(job, &err));
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, GOLDEN_SRC_READ_EIO_REPORT);
    bj_job_unref(&job);
    bj_context_free(&ctx);
}

static void target_enospc_stops_and_resume_retries(void)
{
    BjContext *ctx = setup(NULL, "write_aio", ENOSPC, 1);
    BjMirrorOptions o = defaults();
    BjBlockJobInfo *info;
    BjError *err = NULL;
    BjJob *job;
    Trace t = { "", 0 };

    o.on_target_error = BJ_BLOCKDEV_ON_ERROR_STOP;
    job = start(ctx, &o);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_PAUSED, 10000));
    info = bj_block_job_query(job, &err);
    CHECK_NO_ERR(err);
    CHECK(info->paused);
    CHECK_INT(info->io_status, BJ_BLOCK_DEVICE_IO_STATUS_NOSPACE);
    bj_block_job_info_free(&info);
    CHECK(bj_job_user_resume(job, &err));
    CHECK_NO_ERR(err);
    trace_until_ready(ctx, &t);
    info = bj_block_job_query(job, &err);
    CHECK_NO_ERR(err);
    CHECK_INT(info->io_status, BJ_BLOCK_DEVICE_IO_STATUS_OK);
    /* In sync: nothing left, so done now and converged; the source is all
     * data (nothing skipped) and the retried range is not guest dirt. */
    CHECK_INT(info->eta, 0);
    CHECK_INT(info->converging, 1);
    CHECK_INT(info->skipped, 0);
    CHECK_INT(info->dirty_rate, 0);
    CHECK(info->copy_rate > 0);
    bj_block_job_info_free(&info);
    CHECK(bj_job_complete(job, &err));
    trace_until_null(ctx, &t);
    CHECK_STR(t.text, GOLDEN_TGT_WRITE_ENOSPC_STOP);
    CHECK(files_equal(src_path, tgt_path));
    bj_job_unref(&job);
    bj_context_free(&ctx);
}

static void refused(BjContext *ctx, const BjMirrorOptions *o, const char *msg)
{
    BjError *err = NULL;
    CHECK(bj_blockdev_mirror(ctx, o, &err) == NULL);
    CHECK_ERR(err, G, msg);
}

static void bad_arguments(void)
{
    BjContext *ctx = setup(NULL, NULL, 0, 0);
    BjMirrorOptions o = defaults();
    BjError *err = NULL;
    BjJob *job;

    CHECK(bj_blockdev_mirror(NULL, &o, &err) == NULL);
    CHECK_ERR(err, G, "Invalid argument: 'ctx' must not be NULL");
    refused(ctx, NULL, "Invalid argument: 'opts' must not be NULL");
    o.size = 8;
    CHECK(bj_blockdev_mirror(ctx, &o, &err) == NULL);
    CHECK(err && strstr(bj_error_get_pretty(err), "opts->size is 8"));
    bj_error_free(&err);
    o = defaults();
    o.reserved[3] = 1;
    refused(ctx, &o, "Invalid argument: opts->reserved must be zero");
    o = defaults();
    o.device = NULL;
    refused(ctx, &o, "Invalid argument: 'opts->device' must not be NULL");

    /* QEMU's texts (qemu-storage-daemon 10, blockdev-mirror). */
    o = defaults();
    o.granularity = 1000;
    refused(ctx, &o, "Parameter 'granularity' expects a power of 2");
    o.granularity = 256;
    refused(ctx, &o, "Parameter 'granularity' expects a value in range [512B, 64MB]");
    o.granularity = 128LL << 20;
    refused(ctx, &o, "Parameter 'granularity' expects a value in range [512B, 64MB]");
    o = defaults();
    o.speed = -1;
    refused(ctx, &o, "Parameter 'speed' expects a non-negative value");
    o = defaults();
    o.buf_size = -1;
    refused(ctx, &o, "Invalid parameter 'buf-size'");
    o = defaults();
    o.target = "src";
    refused(ctx, &o, "Can't mirror node into itself");
    o = defaults();
    o.device = "nope";
    refused(ctx, &o, "Cannot find device='nope' nor node-name='nope'");
    o = defaults();
    o.target = "nope";
    refused(ctx, &o, "Cannot find device='nope' nor node-name='nope'");
    o = defaults();
    o.sync = BJ_MIRROR_SYNC_MODE_INCREMENTAL;
    refused(ctx, &o, "Sync mode 'incremental' not supported");
    o.sync = BJ_MIRROR_SYNC_MODE_BITMAP;
    refused(ctx, &o, "Sync mode 'bitmap' not supported");
    o.sync = 5;
    refused(ctx, &o, "Invalid argument: opts->sync 5 is out of range");
    o = defaults();
    o.replaces = "nope";
    refused(ctx, &o, "Failed to find node with node-name='nope'");
    o.replaces = "tgt";
    refused(ctx, &o,
            "Cannot replace 'tgt' by a node mirrored from 'src', because it cannot be "
            "guaranteed that doing so would not lead to an abrupt change of visible data");
    o = defaults();
    o.copy_mode = -1;
    refused(ctx, &o, "Invalid argument: opts->copy_mode -1 is out of range");
    o = defaults();
    o.on_target_error = 9;
    refused(ctx, &o, "Invalid argument: opts->on_target_error 9 is out of range");

    /* A node in use by a job; nothing above was left half-created. */
    o = defaults();
    o.speed = 1; /* keeps the job busy */
    job = start(ctx, &o);
    o.job_id = "job1";
    refused(ctx, &o, "Need a root block node");
    o.device = "tgt";
    o.target = "src";
    refused(ctx, &o, "Need a root block node");
    o.job_id = "job0";
    o.device = "src";
    o.target = "tgt";
    refused(ctx, &o, "Need a root block node");
    CHECK_INT(bj_job_cancel_sync(job, true), -ECANCELED);
    bj_job_unref(&job);
    /* The nodes are free again. */
    o = defaults();
    job = start(ctx, &o);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_READY, 10000));
    CHECK_INT(bj_job_complete_sync(job, &err), 0);
    CHECK_NO_ERR(err);
    bj_job_unref(&job);
    bj_context_free(&ctx);
}

/* ---- write-blocking with a writing guest ---------------------------------- */

#define BIG (64LL << 20)

typedef struct {
    BjBlockBackend *blk;
    int stop;
    int writes;
    unsigned seed;
} Guest;

/* The job's filter node: named by filter_node_name, shown by
 * query-named-block-nodes while the job runs, gone after; QEMU's
 * refusals of names it cannot take. */
static void filter_node_name_names_mirror_top(void)
{
    BjContext *ctx = setup(NULL, NULL, 0, 0);
    BjMirrorOptions o = defaults();
    BjError *err = NULL;
    BjJob *job;
    Trace t = { "", 0 };
    const char *query = "{\"execute\":\"query-named-block-nodes\","
                        "\"arguments\":{\"flat\":true}}";
    char *r;

    o.filter_node_name = "tgt";
    refused(ctx, &o, "Duplicate nodes with node-name='tgt'");
    o.filter_node_name = "bad name";
    refused(ctx, &o, "Invalid node-name: 'bad name'");
    o.filter_node_name = "mf";
    o.speed = 1; /* the first burst, then it waits */
    job = start(ctx, &o);
    r = bj_qmp_execute(ctx, query, &err);
    CHECK_NO_ERR(err);
    CHECK(strstr(r, "\"node-name\":\"mf\""));
    CHECK(strstr(r, "\"drv\":\"mirror_top\""));
    bj_free(r);
    CHECK(bj_job_user_cancel(job, true, &err));
    CHECK_NO_ERR(err);
    trace_until_null(ctx, &t);
    r = bj_qmp_execute(ctx, query, &err);
    CHECK_NO_ERR(err);
    CHECK(!strstr(r, "mirror_top"));
    bj_free(r);
    bj_job_unref(&job);
    bj_context_free(&ctx);
}

static void *guest_thread(void *arg)
{
    Guest *g = arg;
    static char buf[256 << 10];
    while (!__atomic_load_n(&g->stop, __ATOMIC_SEQ_CST)) {
        BjError *err = NULL;
        unsigned r = rand_r(&g->seed);
        long long len = 512LL * (1 + r % 512);
        long long off = (long long)(rand_r(&g->seed) % (unsigned)((BIG - len) / 512)) * 512;
        memset(buf, (int)(r & 0xff), (size_t)len);
        if (bj_blk_pwrite(g->blk, off, buf, len, NULL, &err) != 0) {
            FAIL("guest write: %s", err ? bj_error_get_pretty(err) : "?");
        }
        g->writes++;
    }
    return NULL;
}

/* Write-blocking from the start, or (switch) started in background and
 * switched by block-job-change while the guest writes: either way the job
 * must converge under the steady writes. */
static void guest_writes_in_write_blocking(int switch_later)
{
    BjContext *ctx = new_ctx();
    BjMirrorOptions o = defaults();
    BjBlockJobInfo *info;
    BjError *err = NULL;
    Guest g;
    pthread_t th;
    BjJob *job;

    make_image(src_path, sizeof(src_path), "mirror-wb-src.img", BIG, 0x5a);
    make_image(tgt_path, sizeof(tgt_path), "mirror-wb-tgt.img", BIG, 0);
    add_raw(ctx, "src", src_path, NULL, 0, 0);
    add_raw(ctx, "tgt", tgt_path, NULL, 0, 0);
    memset(&g, 0, sizeof(g));
    g.seed = 7;
    g.blk = bj_blk_new(ctx, "src", NULL, &err);
    CHECK_NO_ERR(err);
    CHECK(pthread_create(&th, NULL, guest_thread, &g) == 0);
    o.copy_mode = switch_later ? BJ_MIRROR_COPY_MODE_BACKGROUND : BJ_MIRROR_COPY_MODE_WRITE_BLOCKING;
    job = start(ctx, &o);
    if (switch_later) {
        sleep_ms(30);
        CHECK(bj_block_job_change_copy_mode(job, BJ_MIRROR_COPY_MODE_WRITE_BLOCKING, &err));
        CHECK_NO_ERR(err);
        /* Again: nothing to change. Back: QEMU has no way back. */
        CHECK(bj_block_job_change_copy_mode(job, BJ_MIRROR_COPY_MODE_WRITE_BLOCKING, &err));
        CHECK_NO_ERR(err);
        CHECK(!bj_block_job_change_copy_mode(job, BJ_MIRROR_COPY_MODE_BACKGROUND, &err));
        CHECK_ERR(err, G, "Change to copy mode 'background' is not implemented");
        CHECK(!bj_block_job_change_copy_mode(job, 7, &err));
        CHECK_ERR(err, G, "Invalid argument: copy_mode 7 is out of range");
        CHECK(!bj_block_job_change_copy_mode(NULL, BJ_MIRROR_COPY_MODE_WRITE_BLOCKING, &err));
        CHECK(err != NULL);
        bj_error_free(&err);
    }
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_READY, 60000));
    /* The guest keeps writing after READY; the job stays in sync. */
    sleep_ms(100);
    info = bj_block_job_query(job, &err);
    CHECK_NO_ERR(err);
    CHECK_INT(info->actively_synced, 1);
    bj_block_job_info_free(&info);
    __atomic_store_n(&g.stop, 1, __ATOMIC_SEQ_CST);
    CHECK(pthread_join(th, NULL) == 0);
    CHECK(g.writes > 0);
    CHECK_INT(bj_job_complete_sync(job, &err), 0);
    CHECK_NO_ERR(err);
    CHECK(files_equal(src_path, tgt_path));
    bj_job_unref(&job);
    bj_blk_free(&g.blk);
    bj_context_free(&ctx);
    unlink(src_path);
    unlink(tgt_path);
}

static void write_blocking_with_guest_writes(void)
{
    guest_writes_in_write_blocking(0);
}

static void switch_to_write_blocking_with_guest_writes(void)
{
    guest_writes_in_write_blocking(1);
}

int main(void)
{
    RUN(complete_pivots_the_guest);
    RUN(complete_on_io_uring_nodes);
    RUN(soft_cancel_after_ready_completes_without_pivot);
    RUN(force_cancel_after_ready);
    RUN(source_read_error_ignored_once);
    RUN(source_read_error_reported);
    RUN(target_enospc_stops_and_resume_retries);
    RUN(bad_arguments);
    RUN(filter_node_name_names_mirror_top);
    RUN(write_blocking_with_guest_writes);
    RUN(switch_to_write_blocking_with_guest_writes);
    unlink(src_path);
    unlink(tgt_path);
    return 0;
}
