/*
 * The block-job error matrix: every on-error policy (report, ignore, stop,
 * enospc, auto) x source read / target write x EIO / ENOSPC, injected once
 * by blkdebug into a mirror-like copy job (util.h's CopyJob) between two
 * 4 MiB raw images. Each case checks the events, the actions, the I/O
 * status and job status at the pause, the resume behaviour, and the
 * target's content; then prints one JSON line that tests/error_matrix_oracle.rs
 * compares with what real qemu-storage-daemon does for the same case.
 */
#include "util.h"

#define SIZE (4 << 20)

static const char *policies[] = { "report", "ignore", "enospc", "stop", "auto" };

typedef struct {
    char events[4096];
    char paused[256];
    char resumed[256];
    char pause_err[256];
    char cancel_err[256];
    int identical;
} Outcome;

static void json_events(const Trace *t, char *out, size_t n)
{
    /* "A B C" -> ["A","B","C"] */
    const char *p = t->text;
    size_t len = 0;
    len += (size_t)snprintf(out + len, n - len, "[");
    while (*p) {
        const char *sp = strchr(p, ' ');
        size_t w = sp ? (size_t)(sp - p) : strlen(p);
        /* Keep parenthesised texts with spaces together. */
        if (strchr(p, '(') && strchr(p, '(') < (sp ? sp : p + w)) {
            const char *close = strchr(p, ')');
            if (close) {
                w = (size_t)(close - p + 1);
                sp = p[w] ? p + w : NULL;
            }
        }
        len += (size_t)snprintf(out + len, n - len, "%s\"%.*s\"", len > 1 ? "," : "", (int)w, p);
        if (!sp) {
            break;
        }
        p = sp + 1;
    }
    snprintf(out + len, n - len, "]");
}

static void snapshot(BjJob *job, char *out, size_t n, int with_status)
{
    BjError *err = NULL;
    BjBlockJobInfo *i = bj_block_job_query(job, &err);
    CHECK_NO_ERR(err);
    if (with_status) {
        snprintf(out, n, "{\"status\":\"%s\",\"paused\":%s,\"io-status\":\"%s\"}",
                 bj_job_status_str(i->status), i->paused ? "true" : "false",
                 bj_block_device_io_status_str(i->io_status));
    } else {
        snprintf(out, n, "{\"paused\":%s,\"io-status\":\"%s\"}", i->paused ? "true" : "false",
                 bj_block_device_io_status_str(i->io_status));
    }
    bj_block_job_info_free(&i);
}

/* Run one case; `once` = 0 makes the error persistent (then the test
 * force-cancels at the second pause). */
static void run_case(int source_side, int policy, int err_no, int once, Outcome *o)
{
    char src[1024], tgt[1024], name[64];
    BjContext *ctx = new_ctx();
    BjError *err = NULL;
    BjJob *job;
    Trace t = { "", 0 };
    int pauses = 0, done = 0;
    memset(o, 0, sizeof(*o));
    snprintf(name, sizeof(name), "src-%d-%d-%d.raw", source_side, policy, err_no);
    make_image(src, sizeof(src), name, SIZE, 0x5a);
    snprintf(name, sizeof(name), "tgt-%d-%d-%d.raw", source_side, policy, err_no);
    make_image(tgt, sizeof(tgt), name, SIZE, 0);
    add_raw(ctx, "src", src, source_side ? "read_aio" : NULL, err_no, once);
    add_raw(ctx, "tgt", tgt, source_side ? NULL : "write_aio", err_no, once);
    job = copy_job_new(ctx, "job0", "src", "tgt", source_side ? policy : BJ_BLOCKDEV_ON_ERROR_REPORT,
                       source_side ? BJ_BLOCKDEV_ON_ERROR_REPORT : policy, 0, &err);
    CHECK_NO_ERR(err);
    CHECK(bj_job_start(job, &err));
    CHECK_NO_ERR(err);
    while (!done) {
        BjEvent *ev = next_event(ctx, 10000);
        if (!ev) {
            FAIL("no event within 10 s; so far: %s", t.text);
        }
        trace_add(&t, ev);
        if (ev->kind == BJ_EVENT_JOB_STATUS_CHANGE && ev->status == BJ_JOB_STATUS_PAUSED) {
            pauses++;
            if (pauses == 1) {
                snapshot(job, o->paused, sizeof(o->paused), 1);
                CHECK(!bj_job_user_pause(job, &err));
                snprintf(o->pause_err, sizeof(o->pause_err), "%s", bj_error_get_pretty(err));
                bj_error_free(&err);
                CHECK(!bj_block_job_cancel(job, false, &err));
                snprintf(o->cancel_err, sizeof(o->cancel_err), "%s", bj_error_get_pretty(err));
                bj_error_free(&err);
                CHECK(bj_job_user_resume(job, &err));
                CHECK_NO_ERR(err);
                snapshot(job, o->resumed, sizeof(o->resumed), 0);
            } else {
                /* A persistent error pauses again: force-cancel it. */
                CHECK(bj_block_job_cancel(job, true, &err));
                CHECK_NO_ERR(err);
            }
        } else if (ev->kind == BJ_EVENT_BLOCK_JOB_READY) {
            CHECK(bj_job_complete(job, &err));
            CHECK_NO_ERR(err);
        } else if (ev->kind == BJ_EVENT_JOB_STATUS_CHANGE && ev->status == BJ_JOB_STATUS_NULL) {
            done = 1;
        }
        bj_event_free(&ev);
    }
    bj_job_unref(&job);
    bj_context_free(&ctx);
    json_events(&t, o->events, sizeof(o->events));
    o->identical = files_equal(src, tgt);
    printf("{\"side\":\"%s\",\"policy\":\"%s\",\"errno\":%d,\"once\":%s,\"events\":%s,"
           "\"paused\":%s,\"resumed\":%s,\"pause_err\":\"%s\",\"cancel_err\":\"%s\","
           "\"identical\":%s}\n",
           source_side ? "source" : "target", policies[policy], err_no, once ? "true" : "false",
           o->events, o->paused[0] ? o->paused : "null", o->resumed[0] ? o->resumed : "null",
           o->pause_err, o->cancel_err, o->identical ? "true" : "false");
}

/* What QEMU's mirror does for a one-shot error (recorded with
 * qemu-storage-daemon 10, see ../shared/spec/traces and the oracle test). */
static void check_once(int source_side, int policy, int err_no)
{
    Outcome o;
    char want[1024];
    const char *op = source_side ? "read" : "write";
    int stop = policy == BJ_BLOCKDEV_ON_ERROR_STOP ||
               ((policy == BJ_BLOCKDEV_ON_ERROR_ENOSPC || policy == BJ_BLOCKDEV_ON_ERROR_AUTO) &&
                err_no == ENOSPC);
    int report = !stop && policy != BJ_BLOCKDEV_ON_ERROR_IGNORE;
    run_case(source_side, policy, err_no, 1, &o);
    if (report) {
        snprintf(want, sizeof(want),
                 "[\"JSC:created\",\"JSC:running\",\"ERR(%s,report)\",\"JSC:aborting\","
                 "\"COMPLETED(%s)\",\"JSC:concluded\",\"JSC:null\"]",
                 op, strerror(err_no));
        CHECK_STR(o.events, want);
        CHECK(!o.identical);
    } else if (stop) {
        snprintf(want, sizeof(want),
                 "[\"JSC:created\",\"JSC:running\",\"ERR(%s,stop)\",\"JSC:paused\",\"JSC:running\","
                 "\"JSC:ready\",\"READY\",\"JSC:waiting\",\"JSC:pending\",\"COMPLETED\","
                 "\"JSC:concluded\",\"JSC:null\"]",
                 op);
        CHECK_STR(o.events, want);
        snprintf(want, sizeof(want), "{\"status\":\"paused\",\"paused\":true,\"io-status\":\"%s\"}",
                 err_no == ENOSPC ? "nospace" : "failed");
        CHECK_STR(o.paused, want);
        CHECK_STR(o.resumed, "{\"paused\":false,\"io-status\":\"ok\"}");
        CHECK_STR(o.pause_err, "Job is already paused");
        CHECK_STR(o.cancel_err, "The block job for device 'job0' is currently paused");
        CHECK(o.identical);
    } else {
        snprintf(want, sizeof(want),
                 "[\"JSC:created\",\"JSC:running\",\"ERR(%s,ignore)\",\"JSC:ready\",\"READY\","
                 "\"JSC:waiting\",\"JSC:pending\",\"COMPLETED\",\"JSC:concluded\",\"JSC:null\"]",
                 op);
        CHECK_STR(o.events, want);
        CHECK(o.identical);
    }
}

#define CASE(side, pol, e)                                                    \
    static void side##_##pol##_##e(void)                                     \
    {                                                                         \
        check_once(side_##side, BJ_BLOCKDEV_ON_ERROR_##pol, e);              \
    }

enum { side_source = 1, side_target = 0 };

CASE(source, REPORT, EIO)
CASE(source, REPORT, ENOSPC)
CASE(source, IGNORE, EIO)
CASE(source, IGNORE, ENOSPC)
CASE(source, STOP, EIO)
CASE(source, STOP, ENOSPC)
CASE(source, ENOSPC, EIO)
CASE(source, ENOSPC, ENOSPC)
CASE(source, AUTO, EIO)
CASE(source, AUTO, ENOSPC)
CASE(target, REPORT, EIO)
CASE(target, REPORT, ENOSPC)
CASE(target, IGNORE, EIO)
CASE(target, IGNORE, ENOSPC)
CASE(target, STOP, EIO)
CASE(target, STOP, ENOSPC)
CASE(target, ENOSPC, EIO)
CASE(target, ENOSPC, ENOSPC)
CASE(target, AUTO, EIO)
CASE(target, AUTO, ENOSPC)

/* A persistent error with stop pauses again after every resume; a forced
 * cancel of the paused job ends it with BLOCK_JOB_CANCELLED. */
static void persistent_stop(int source_side)
{
    Outcome o;
    char want[1024];
    const char *op = source_side ? "read" : "write";
    run_case(source_side, BJ_BLOCKDEV_ON_ERROR_STOP, EIO, 0, &o);
    snprintf(want, sizeof(want),
             "[\"JSC:created\",\"JSC:running\",\"ERR(%s,stop)\",\"JSC:paused\",\"JSC:running\","
             "\"ERR(%s,stop)\",\"JSC:paused\",\"JSC:running\",\"JSC:aborting\",\"CANCELLED\","
             "\"JSC:concluded\",\"JSC:null\"]",
             op, op);
    CHECK_STR(o.events, want);
}

static void source_persistent_stop(void)
{
    persistent_stop(1);
}

static void target_persistent_stop(void)
{
    persistent_stop(0);
}

int main(void)
{
    RUN(source_REPORT_EIO);
    RUN(source_REPORT_ENOSPC);
    RUN(source_IGNORE_EIO);
    RUN(source_IGNORE_ENOSPC);
    RUN(source_STOP_EIO);
    RUN(source_STOP_ENOSPC);
    RUN(source_ENOSPC_EIO);
    RUN(source_ENOSPC_ENOSPC);
    RUN(source_AUTO_EIO);
    RUN(source_AUTO_ENOSPC);
    RUN(target_REPORT_EIO);
    RUN(target_REPORT_ENOSPC);
    RUN(target_IGNORE_EIO);
    RUN(target_IGNORE_ENOSPC);
    RUN(target_STOP_EIO);
    RUN(target_STOP_ENOSPC);
    RUN(target_ENOSPC_EIO);
    RUN(target_ENOSPC_ENOSPC);
    RUN(target_AUTO_EIO);
    RUN(target_AUTO_ENOSPC);
    RUN(source_persistent_stop);
    RUN(target_persistent_stop);
    return 0;
}
