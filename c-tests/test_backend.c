/*
 * Guest backends: rerror/werror policies with BLOCK_IO_ERROR (QEMU 10's
 * fields), the device I/O status, bad arguments, drained sections that
 * wait for requests (not jobs), and the VM-stop burst: guest errors and
 * job errors at the same time, drained, with no event lost or reordered.
 */
#include <pthread.h>

#include "util.h"

#define SIZE (4 << 20)

static BjBlockBackend *backend(BjContext *ctx, const char *node, const char *name, int rerror,
                               int werror)
{
    BjBlockBackendOptions o;
    BjError *err = NULL;
    BjBlockBackend *b;
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.name = name;
    o.qom_path = "/machine/peripheral/disk0/virtio-backend";
    o.rerror = rerror;
    o.werror = werror;
    o.iostatus_enabled = true;
    b = bj_blk_new(ctx, node, &o, &err);
    CHECK_NO_ERR(err);
    CHECK(b);
    return b;
}

/* One guest request against a node whose blkdebug fails it once. */
static void policy_case(int policy, int is_read, int err_no)
{
    char path[1024], buf[4096], want_reason[128];
    BjContext *ctx = new_ctx();
    BjBlockBackend *blk;
    BjError *err = NULL;
    BjEvent *ev;
    int action = -2, r;
    int stop = policy == BJ_BLOCKDEV_ON_ERROR_STOP ||
               ((policy == BJ_BLOCKDEV_ON_ERROR_ENOSPC ||
                 (policy == BJ_BLOCKDEV_ON_ERROR_AUTO && !is_read)) &&
                err_no == ENOSPC);
    int ignore = policy == BJ_BLOCKDEV_ON_ERROR_IGNORE;
    int want_action = stop ? BJ_BLOCK_ERROR_ACTION_STOP
                           : ignore ? BJ_BLOCK_ERROR_ACTION_IGNORE : BJ_BLOCK_ERROR_ACTION_REPORT;
    make_image(path, sizeof(path), "backend.img", SIZE, 0x11);
    add_raw(ctx, "disk", path, is_read ? "read_aio" : "write_aio", err_no, 1);
    blk = backend(ctx, "disk", "drive0", policy, policy);
    memset(buf, 0x22, sizeof(buf));
    if (is_read) {
        r = bj_blk_pread(blk, 0, buf, sizeof(buf), &action, &err);
    } else {
        r = bj_blk_pwrite(blk, 0, buf, sizeof(buf), &action, &err);
    }
    CHECK_INT(action, want_action);
    if (ignore) {
        /* The guest sees success. */
        CHECK_INT(r, 0);
        CHECK(err == NULL);
    } else {
        CHECK_INT(r, -err_no);
        CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, strerror(err_no));
    }
    CHECK_INT(bj_blk_get_iostatus(blk),
              stop ? (err_no == ENOSPC ? BJ_BLOCK_DEVICE_IO_STATUS_NOSPACE
                                       : BJ_BLOCK_DEVICE_IO_STATUS_FAILED)
                   : BJ_BLOCK_DEVICE_IO_STATUS_OK);
    ev = next_event(ctx, 1000);
    CHECK(ev);
    CHECK_INT(ev->kind, BJ_EVENT_BLOCK_IO_ERROR);
    CHECK_STR(ev->name, "BLOCK_IO_ERROR");
    CHECK_STR(ev->device, "drive0");
    CHECK_STR(ev->node_name, "disk");
    CHECK_STR(ev->qom_path, "/machine/peripheral/disk0/virtio-backend");
    CHECK_INT(ev->operation, is_read ? BJ_IO_OPERATION_TYPE_READ : BJ_IO_OPERATION_TYPE_WRITE);
    CHECK_INT(ev->action, want_action);
    CHECK_INT(ev->nospace, err_no == ENOSPC);
    snprintf(want_reason, sizeof(want_reason), "%s", strerror(err_no));
    CHECK_STR(ev->reason, want_reason);
    CHECK(strstr(ev->json, "\"event\":\"BLOCK_IO_ERROR\"") != NULL);
    CHECK(strstr(ev->json, "\"qom-path\":\"/machine/peripheral/disk0/virtio-backend\"") != NULL);
    bj_event_free(&ev);
    /* The one-shot error is gone: the retry succeeds; iostatus stays until reset. */
    action = -2;
    if (is_read) {
        r = bj_blk_pread(blk, 0, buf, sizeof(buf), &action, &err);
    } else {
        r = bj_blk_pwrite(blk, 0, buf, sizeof(buf), &action, &err);
    }
    CHECK_INT(r, 0);
    CHECK_INT(action, -1);
    bj_blk_iostatus_reset(blk);
    CHECK_INT(bj_blk_get_iostatus(blk), BJ_BLOCK_DEVICE_IO_STATUS_OK);
    bj_blk_free(&blk);
    bj_context_free(&ctx);
}

static void each_policy(int policy)
{
    policy_case(policy, 1, EIO);
    policy_case(policy, 1, ENOSPC);
    policy_case(policy, 0, EIO);
    policy_case(policy, 0, ENOSPC);
}

static void policy_report(void)
{
    each_policy(BJ_BLOCKDEV_ON_ERROR_REPORT);
}

static void policy_ignore(void)
{
    each_policy(BJ_BLOCKDEV_ON_ERROR_IGNORE);
}

static void policy_stop(void)
{
    each_policy(BJ_BLOCKDEV_ON_ERROR_STOP);
}

static void policy_enospc(void)
{
    each_policy(BJ_BLOCKDEV_ON_ERROR_ENOSPC);
}

/* auto = QEMU's -drive defaults: rerror report, werror enospc. */
static void policy_auto(void)
{
    each_policy(BJ_BLOCKDEV_ON_ERROR_AUTO);
}

static void iostatus_first_error_wins(void)
{
    char path[1024], buf[512];
    BjContext *ctx = new_ctx();
    BjBlockBackend *blk;
    char json[2048];
    BjError *err = NULL;
    make_image(path, sizeof(path), "first.img", SIZE, 0);
    snprintf(json, sizeof(json),
             "{\"driver\":\"raw\",\"node-name\":\"d\",\"file\":{\"driver\":\"blkdebug\","
             "\"image\":{\"driver\":\"file\",\"filename\":\"%s\"},\"inject-error\":["
             "{\"event\":\"read_aio\",\"errno\":28,\"once\":true},"
             "{\"event\":\"write_aio\",\"errno\":5,\"once\":true}]}}",
             path);
    CHECK(bj_blockdev_add(ctx, json, &err));
    blk = backend(ctx, "d", "", BJ_BLOCKDEV_ON_ERROR_STOP, BJ_BLOCKDEV_ON_ERROR_STOP);
    CHECK_INT(bj_blk_pread(blk, 0, buf, sizeof(buf), NULL, &err), -ENOSPC);
    bj_error_free(&err);
    CHECK_INT(bj_blk_get_iostatus(blk), BJ_BLOCK_DEVICE_IO_STATUS_NOSPACE);
    CHECK_INT(bj_blk_pwrite(blk, 0, buf, sizeof(buf), NULL, &err), -EIO);
    bj_error_free(&err);
    CHECK_INT(bj_blk_get_iostatus(blk), BJ_BLOCK_DEVICE_IO_STATUS_NOSPACE);
    bj_blk_free(&blk);
    bj_context_free(&ctx);
}

static void bad_arguments(void)
{
    char path[1024], buf[512];
    BjContext *ctx = new_ctx();
    BjBlockBackend *blk, *b2;
    BjBlockBackendOptions o;
    BjError *err = NULL;
    int action = 7;
    make_image(path, sizeof(path), "args.img", SIZE, 0);
    add_raw(ctx, "n", path, NULL, 0, 0);
    blk = backend(ctx, "n", "dev", BJ_BLOCKDEV_ON_ERROR_AUTO, BJ_BLOCKDEV_ON_ERROR_AUTO);
    CHECK_INT(bj_blk_pread(blk, -1, buf, sizeof(buf), &action, &err), -EINVAL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: negative offset or length");
    CHECK_INT(action, -1);
    CHECK_INT(bj_blk_pwrite(blk, 0, NULL, 512, &action, &err), -EINVAL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: 'buf' must not be NULL");
    CHECK_INT(bj_blk_pread(NULL, 0, buf, 512, &action, &err), -EINVAL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: 'blk' must not be NULL");
    /* Beyond the end: an I/O error through the policy, like QEMU. */
    CHECK_INT(bj_blk_pread(blk, SIZE, buf, 512, &action, &err), -EIO);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Input/output error");
    CHECK_INT(action, BJ_BLOCK_ERROR_ACTION_REPORT);
    CHECK_INT(bj_blk_getlength(blk, &err), SIZE);
    CHECK_INT(bj_blk_get_iostatus(NULL), -1);
    memset(&o, 0, sizeof(o));
    o.size = sizeof(o);
    o.name = "dev";
    CHECK(bj_blk_new(ctx, "n", &o, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Device with id 'dev' already exists");
    o.name = "n";
    CHECK(bj_blk_new(ctx, "n", &o, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Device name 'n' conflicts with an existing node name");
    o.name = "1bad";
    CHECK(bj_blk_new(ctx, "n", &o, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid device name '1bad'");
    o.name = NULL;
    o.rerror = 9;
    CHECK(bj_blk_new(ctx, "n", &o, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Invalid argument: rerror 9 is not a BlockdevOnError");
    o.rerror = 0;
    o.size = 3;
    CHECK(bj_blk_new(ctx, "n", &o, &err) == NULL);
    CHECK(err != NULL);
    bj_error_free(&err);
    CHECK(bj_blk_new(ctx, "nosuch", NULL, &err) == NULL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "Cannot find device='nosuch' nor node-name='nosuch'");
    /* A device name works where a node name does. */
    b2 = bj_blk_new(ctx, "dev", NULL, &err);
    CHECK_NO_ERR(err);
    bj_blk_free(&b2);
    bj_blk_free(&blk);
    bj_blk_free(&blk); /* NULL after the first free: a no-op */
    bj_context_free(&ctx);
}

/* ---- request flags ----------------------------------------------------- */

typedef struct {
    char data[65536];
    int writes, zeroes, flushes;
} FlagDisk;

static int64_t fd_len(void *opaque)
{
    (void)opaque;
    return 65536;
}

static int fd_read(void *opaque, int64_t off, void *buf, int64_t n)
{
    memcpy(buf, ((FlagDisk *)opaque)->data + off, (size_t)n);
    return 0;
}

static int fd_write(void *opaque, int64_t off, const void *buf, int64_t n)
{
    FlagDisk *d = opaque;
    memcpy(d->data + off, buf, (size_t)n);
    d->writes++;
    return 0;
}

static int fd_zeroes(void *opaque, int64_t off, int64_t n, bool may_unmap)
{
    FlagDisk *d = opaque;
    (void)may_unmap;
    memset(d->data + off, 0, (size_t)n);
    d->zeroes++;
    return 0;
}

static int fd_flush(void *opaque)
{
    ((FlagDisk *)opaque)->flushes++;
    return 0;
}

/* FUA on a node that cannot carry it is a write and then a flush (QEMU's
 * emulation); a fast zero it cannot promise is -ENOTSUP with nothing
 * written; unknown flags are refused before any I/O. */
static void request_flags(void)
{
    static FlagDisk d;
    BjContext *ctx = new_ctx();
    BjHostNodeOps ops;
    BjBlockBackend *blk;
    BjNode *node;
    BjError *err = NULL;
    char buf[4096];
    int action = 7;
    memset(&d, 0, sizeof(d));
    memset(&ops, 0, sizeof(ops));
    ops.size = sizeof(ops);
    ops.get_length = fd_len;
    ops.pread = fd_read;
    ops.pwrite = fd_write;
    ops.pwrite_zeroes = fd_zeroes;
    ops.flush = fd_flush;
    node = bj_node_add_host(ctx, "fd", false, &ops, &d, &err);
    CHECK(node != NULL);
    CHECK_NO_ERR(err);
    blk = backend(ctx, "fd", "dev", BJ_BLOCKDEV_ON_ERROR_AUTO, BJ_BLOCKDEV_ON_ERROR_AUTO);
    memset(buf, 0x5a, sizeof(buf));
    CHECK_INT(bj_blk_pwrite_flags(blk, 0, buf, 4096, 0, NULL, &err), 0);
    CHECK_INT(d.writes, 1);
    CHECK_INT(d.flushes, 0);
    CHECK_INT(bj_blk_pwrite_flags(blk, 4096, buf, 4096, BJ_REQ_FUA, NULL, &err), 0);
    CHECK_INT(d.writes, 2);
    CHECK_INT(d.flushes, 1);
    CHECK_INT(bj_blk_pwrite_zeroes_flags(blk, 0, 4096, BJ_REQ_MAY_UNMAP | BJ_REQ_FUA, NULL, &err), 0);
    CHECK_INT(d.zeroes, 1);
    CHECK_INT(d.flushes, 2);
    CHECK_INT(bj_blk_pwrite_zeroes_flags(blk, 4096, 4096, BJ_REQ_NO_FALLBACK, &action, &err), -ENOTSUP);
    CHECK(err != NULL);
    bj_error_free(&err);
    CHECK_INT(d.zeroes, 1);
    CHECK(d.data[4096] == 0x5a);
    CHECK_INT(bj_blk_pwrite_flags(blk, 0, buf, 4096, BJ_REQ_NO_FALLBACK, &action, &err), -EINVAL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "invalid request flags 0x4");
    CHECK_INT(action, -1);
    CHECK_INT(bj_blk_pwrite_zeroes_flags(blk, 0, 4096, 8, &action, &err), -EINVAL);
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "invalid request flags 0x8");
    CHECK_INT(d.writes, 2);
    bj_blk_free(&blk);
    bj_node_unref(&node);
    bj_context_free(&ctx);
}

/* ---- drain ------------------------------------------------------------- */

typedef struct {
    char *data;
    long long size;
    int delay_ms;
    int entered;
    int reads;
    int freed;
} SlowDisk;

static int64_t sd_len(void *opaque)
{
    return ((SlowDisk *)opaque)->size;
}

static int sd_read(void *opaque, int64_t off, void *buf, int64_t n)
{
    SlowDisk *d = opaque;
    __atomic_add_fetch(&d->entered, 1, __ATOMIC_SEQ_CST);
    sleep_ms(d->delay_ms);
    memcpy(buf, d->data + off, (size_t)n);
    __atomic_add_fetch(&d->reads, 1, __ATOMIC_SEQ_CST);
    return 0;
}

static int sd_write(void *opaque, int64_t off, const void *buf, int64_t n)
{
    SlowDisk *d = opaque;
    memcpy(d->data + off, buf, (size_t)n);
    return 0;
}

static void sd_free(void *opaque)
{
    SlowDisk *d = opaque;
    free(d->data);
    d->freed++;
}

typedef struct {
    BjBlockBackend *blk;
    int done;
    int ret;
} Reader;

static void *reader_thread(void *arg)
{
    Reader *r = arg;
    char buf[512];
    r->ret = bj_blk_pread(r->blk, 0, buf, sizeof(buf), NULL, NULL);
    __atomic_store_n(&r->done, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

static void drain_waits_for_requests(void)
{
    static SlowDisk d;
    BjContext *ctx = new_ctx();
    BjHostNodeOps ops;
    BjNode *node;
    BjBlockBackend *blk;
    BjError *err = NULL;
    Reader r1, r2;
    pthread_t t1, t2;
    memset(&d, 0, sizeof(d));
    d.size = 1 << 20;
    d.data = calloc(1, (size_t)d.size);
    d.delay_ms = 200;
    memset(&ops, 0, sizeof(ops));
    ops.size = sizeof(ops);
    ops.get_length = sd_len;
    ops.pread = sd_read;
    ops.pwrite = sd_write;
    ops.free = sd_free;
    node = bj_node_add_host(ctx, "slow", false, &ops, &d, &err);
    CHECK_NO_ERR(err);
    blk = backend(ctx, "slow", "drive0", BJ_BLOCKDEV_ON_ERROR_AUTO, BJ_BLOCKDEV_ON_ERROR_AUTO);
    r1.blk = blk;
    r1.done = 0;
    CHECK(pthread_create(&t1, NULL, reader_thread, &r1) == 0);
    /* Wait until r1 is inside the slow read (no fixed sleep: CI is loaded). */
    while (!__atomic_load_n(&d.entered, __ATOMIC_SEQ_CST)) {
        sleep_ms(1);
    }
    CHECK(bj_blk_drain_begin(blk, &err));
    CHECK_NO_ERR(err);
    /* Drain returned only after the request in flight finished in the
     * driver (the reader thread itself may not have returned yet). */
    CHECK_INT(__atomic_load_n(&d.reads, __ATOMIC_SEQ_CST), 1);
    /* A new guest request waits at the gate until the section ends. */
    d.delay_ms = 0;
    r2.blk = blk;
    r2.done = 0;
    CHECK(pthread_create(&t2, NULL, reader_thread, &r2) == 0);
    sleep_ms(100);
    CHECK(!__atomic_load_n(&r2.done, __ATOMIC_SEQ_CST));
    CHECK_INT(__atomic_load_n(&d.reads, __ATOMIC_SEQ_CST), 1);
    CHECK(bj_blk_drain_end(blk, &err));
    CHECK(pthread_join(t2, NULL) == 0);
    CHECK(r2.done && r2.ret == 0);
    CHECK(pthread_join(t1, NULL) == 0);
    CHECK(r1.done && r1.ret == 0);
    bj_blk_free(&blk);
    bj_node_unref(&node);
    CHECK_INT(d.freed, 0);
    bj_context_free(&ctx);
    CHECK_INT(d.freed, 1);
}

/* drain pauses a job and waits for it to reach its pause point, never for
 * it to finish; bj_drain_all works the same over every node. */
static void drain_pauses_jobs_not_waits(void)
{
    TestJob s;
    BjJobDriver drv = test_driver();
    char path[1024];
    BjContext *ctx = new_ctx();
    BjError *err = NULL;
    BjJob *job;
    BjBlockJobInfo *info;
    memset(&s, 0, sizeof(s));
    make_image(path, sizeof(path), "drainjob.img", SIZE, 0);
    add_raw(ctx, "n", path, NULL, 0, 0);
    job = bj_block_job_create(ctx, "j", &drv, NULL, "n", 0, 0, &s, &err);
    CHECK_NO_ERR(err);
    CHECK(bj_job_start(job, &err));
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_RUNNING, 5000));
    bj_drain_all_begin(ctx);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_PAUSED, 5000));
    info = bj_block_job_query(job, &err);
    CHECK(info->paused);
    CHECK(!info->busy);
    bj_block_job_info_free(&info);
    CHECK(bj_drain_all_end(ctx, &err));
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_RUNNING, 5000));
    CHECK(!bj_drain_all_end(ctx, &err));
    CHECK_ERR(err, BJ_ERROR_CLASS_GENERIC_ERROR, "No drained section to end");
    bj_drain_all(ctx);
    CHECK(bj_job_wait_status(job, BJ_JOB_STATUS_RUNNING, 5000));
    CHECK_INT(bj_job_cancel_sync(job, true), -ECANCELED);
    bj_job_unref(&job);
    bj_context_free(&ctx);
    CHECK_INT(s.freed, 1);
}

/* ---- the VM-stop burst ---------------------------------------------------- */

#define WRITERS 8
#define WRITES 200

typedef struct {
    BjBlockBackend *blk;
    int failures;
    int stops;
} Writer;

static void *writer_thread(void *arg)
{
    Writer *w = arg;
    char buf[4096];
    int i, action;
    memset(buf, 0x33, sizeof(buf));
    for (i = 0; i < WRITES; i++) {
        if (bj_blk_pwrite(w->blk, (int64_t)(i % 64) * 4096, buf, sizeof(buf), &action, NULL) < 0) {
            if (action == BJ_BLOCK_ERROR_ACTION_STOP) {
                __atomic_add_fetch(&w->stops, 1, __ATOMIC_SEQ_CST);
            }
            __atomic_add_fetch(&w->failures, 1, __ATOMIC_SEQ_CST);
        }
    }
    return NULL;
}

typedef struct {
    pthread_mutex_t lock;
    uint64_t last;
    int n, out_of_order;
} Seen;

static void record(const BjEvent *ev, void *opaque)
{
    Seen *s = opaque;
    pthread_mutex_lock(&s->lock);
    if (ev->seq != s->last + 1) {
        s->out_of_order++;
    }
    s->last = ev->seq;
    s->n++;
    pthread_mutex_unlock(&s->lock);
}

static void vm_stop_burst(void)
{
    static Seen seen;
    char src[1024], tgt[1024], disk[1024], json[2048];
    BjContext *ctx = new_ctx();
    BjBlockBackend *blk;
    BjError *err = NULL;
    BjJob *job;
    BjEvent *ev;
    Writer w[WRITERS];
    pthread_t th[WRITERS];
    int i, ioerr = 0, joberr = 0, total = 0, failures = 0;
    uint64_t first = 0, last = 0, handler_id;
    pthread_mutex_init(&seen.lock, NULL);
    seen.n = seen.out_of_order = 0;
    seen.last = 0;
    handler_id = bj_event_add_handler(ctx, record, &seen, NULL, &err);
    CHECK_NO_ERR(err);
    CHECK(handler_id > 0);
    make_image(src, sizeof(src), "burst-src.img", SIZE, 0x5a);
    make_image(tgt, sizeof(tgt), "burst-tgt.img", SIZE, 0);
    make_image(disk, sizeof(disk), "burst-disk.img", SIZE, 0);
    add_raw(ctx, "src", src, NULL, 0, 0);
    /* Every write to the target and to the guest disk fails. */
    add_raw(ctx, "tgt", tgt, "write_aio", EIO, 0);
    snprintf(json, sizeof(json),
             "{\"driver\":\"raw\",\"node-name\":\"disk\",\"file\":{\"driver\":\"blkdebug\","
             "\"image\":{\"driver\":\"file\",\"filename\":\"%s\"},\"inject-error\":"
             "[{\"event\":\"write_aio\",\"errno\":28}]}}",
             disk);
    CHECK(bj_blockdev_add(ctx, json, &err));
    CHECK_NO_ERR(err);
    blk = backend(ctx, "disk", "drive0", BJ_BLOCKDEV_ON_ERROR_AUTO, BJ_BLOCKDEV_ON_ERROR_STOP);
    /* The job retries its failing writes forever (ignore). */
    job = copy_job_new(ctx, "job0", "src", "tgt", BJ_BLOCKDEV_ON_ERROR_REPORT,
                       BJ_BLOCKDEV_ON_ERROR_IGNORE, 0, &err);
    CHECK_NO_ERR(err);
    CHECK(bj_job_start(job, &err));
    for (i = 0; i < WRITERS; i++) {
        w[i].blk = blk;
        w[i].failures = w[i].stops = 0;
        CHECK(pthread_create(&th[i], NULL, writer_thread, &w[i]) == 0);
    }
    sleep_ms(20);
    /* VM stop while everything is failing: when the drain returns, every
     * guest request that completed has had its BLOCK_IO_ERROR emitted, and
     * the rest wait at the gate. */
    bj_drain_all_begin(ctx);
    for (i = 0; i < WRITERS; i++) {
        failures += __atomic_load_n(&w[i].failures, __ATOMIC_SEQ_CST);
    }
    while ((ev = bj_event_next(ctx))) {
        if (total == 0) {
            first = ev->seq;
        } else {
            CHECK_INT(ev->seq, last + 1);
        }
        last = ev->seq;
        total++;
        if (ev->kind == BJ_EVENT_BLOCK_IO_ERROR) {
            ioerr++;
            CHECK_INT(ev->action, BJ_BLOCK_ERROR_ACTION_STOP);
            CHECK_INT(ev->nospace, 1);
        }
        if (ev->kind == BJ_EVENT_BLOCK_JOB_ERROR) {
            joberr++;
            CHECK_INT(ev->action, BJ_BLOCK_ERROR_ACTION_IGNORE);
        }
        bj_event_free(&ev);
    }
    /* A writer counts its failure after its request returned, so up to
     * one failure per writer may be seen in events but not yet counted. */
    CHECK(ioerr >= failures && ioerr <= failures + WRITERS);
    /* Nothing is emitted while everything is drained. */
    sleep_ms(50);
    CHECK(bj_event_next(ctx) == NULL);
    CHECK(bj_drain_all_end(ctx, &err));
    failures = 0;
    for (i = 0; i < WRITERS; i++) {
        CHECK(pthread_join(th[i], NULL) == 0);
        failures += w[i].failures;
        CHECK_INT(w[i].stops, w[i].failures);
    }
    CHECK_INT(failures, WRITERS * WRITES);
    CHECK_INT(bj_job_cancel_sync(job, true), -ECANCELED);
    CHECK(bj_event_flush(ctx, &err));
    CHECK_NO_ERR(err);
    /* The rest of the stream continues the sequence without a gap. */
    while ((ev = bj_event_next(ctx))) {
        CHECK_INT(ev->seq, last + 1);
        last = ev->seq;
        total++;
        if (ev->kind == BJ_EVENT_BLOCK_IO_ERROR) {
            ioerr++;
        }
        if (ev->kind == BJ_EVENT_BLOCK_JOB_ERROR) {
            joberr++;
        }
        bj_event_free(&ev);
    }
    CHECK_INT(first, 1);
    CHECK_INT(ioerr, failures);
    CHECK(joberr > 0);
    /* The handler saw exactly the same sequence. */
    CHECK_INT(seen.n, total);
    CHECK_INT(seen.out_of_order, 0);
    CHECK_INT(seen.last, last);
    CHECK(bj_event_remove_handler(ctx, handler_id, &err));
    bj_job_unref(&job);
    bj_blk_free(&blk);
    bj_context_free(&ctx);
    pthread_mutex_destroy(&seen.lock);
}

int main(void)
{
    RUN(policy_report);
    RUN(policy_ignore);
    RUN(policy_stop);
    RUN(policy_enospc);
    RUN(policy_auto);
    RUN(iostatus_first_error_wins);
    RUN(bad_arguments);
    RUN(request_flags);
    RUN(drain_waits_for_requests);
    RUN(drain_pauses_jobs_not_waits);
    RUN(vm_stop_burst);
    return 0;
}
