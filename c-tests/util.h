/*
 * Shared helpers of the C tests: assertions, a case runner, temporary
 * images, event collection through the queue + eventfd, and a copy job
 * that behaves like QEMU's mirror towards errors (failed chunks stay
 * dirty and are retried; report fails the job; stop pauses it).
 *
 * Each test program: one main() that calls RUN(case) for every case and
 * prints "ok - case" per passed case; the first failed check prints where
 * and exits with status 1.
 */
#ifndef BJ_TEST_UTIL_H
#define BJ_TEST_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "blockjob.h"

static const char *current_case = "?";

#define FAIL(...)                                                         \
    do {                                                                  \
        fprintf(stderr, "%s:%d: in %s: ", __FILE__, __LINE__, current_case); \
        fprintf(stderr, __VA_ARGS__);                                     \
        fprintf(stderr, "\n");                                            \
        printf("not ok - %s\n", current_case);                            \
        exit(1);                                                          \
    } while (0)

#define CHECK(cond)                                                       \
    do {                                                                  \
        if (!(cond)) {                                                    \
            FAIL("check failed: %s", #cond);                              \
        }                                                                 \
    } while (0)

#define CHECK_INT(a, b)                                                   \
    do {                                                                  \
        long long a_ = (long long)(a), b_ = (long long)(b);               \
        if (a_ != b_) {                                                   \
            FAIL("%s == %lld, expected %s == %lld", #a, a_, #b, b_);      \
        }                                                                 \
    } while (0)

#define CHECK_STR(a, b)                                                   \
    do {                                                                  \
        const char *a_ = (a), *b_ = (b);                                  \
        if (!a_ || !b_ || strcmp(a_, b_) != 0) {                          \
            FAIL("%s == \"%s\", expected \"%s\"", #a, a_ ? a_ : "(null)", \
                 b_ ? b_ : "(null)");                                     \
        }                                                                 \
    } while (0)

/* The call succeeded: err is still NULL. */
#define CHECK_NO_ERR(err)                                                 \
    do {                                                                  \
        if (err) {                                                        \
            FAIL("unexpected error: %s", bj_error_get_pretty(err));       \
        }                                                                 \
    } while (0)

/* The call failed with this class and message; frees the error. */
#define CHECK_ERR(err, cls, msg)                                          \
    do {                                                                  \
        if (!(err)) {                                                     \
            FAIL("expected error \"%s\", got none", (msg));               \
        }                                                                 \
        CHECK_STR(bj_error_get_pretty(err), (msg));                       \
        CHECK_INT(bj_error_get_class(err), (cls));                        \
        bj_error_free(&(err));                                            \
        CHECK((err) == NULL);                                             \
    } while (0)

#define RUN(fn)                                                           \
    do {                                                                  \
        current_case = #fn;                                               \
        fn();                                                             \
        printf("ok - %s\n", #fn);                                         \
        fflush(stdout);                                                   \
    } while (0)

static inline void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* ---- temporary images ------------------------------------------------ */

static char tmp_dir[512];

static inline const char *tmpdir(void)
{
    if (!tmp_dir[0]) {
        const char *d = getenv("BJ_TMPDIR");
        if (snprintf(tmp_dir, sizeof(tmp_dir), "%s", d ? d : "/tmp") >= (int)sizeof(tmp_dir)) {
            FAIL("BJ_TMPDIR too long");
        }
    }
    return tmp_dir;
}

/* Create <tmpdir>/<name> of `size` bytes filled with `pattern` (0 = sparse
 * zeroes); writes the path into `path`. */
static inline void make_image(char *path, size_t path_len, const char *name,
                              long long size, int pattern)
{
    int fd;
    if (snprintf(path, path_len, "%s/%s", tmpdir(), name) >= (int)path_len) {
        FAIL("path too long");
    }
    fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0600);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, size) == 0);
    if (pattern) {
        static char buf[65536];
        long long off;
        memset(buf, pattern, sizeof(buf));
        for (off = 0; off < size; off += (long long)sizeof(buf)) {
            size_t n = (size_t)(size - off < (long long)sizeof(buf) ? size - off : (long long)sizeof(buf));
            CHECK(pwrite(fd, buf, n, off) == (ssize_t)n);
        }
    }
    close(fd);
}

/* Add `name` = raw over file(path), or raw over blkdebug over file with
 * one inject-error rule when `event` is non-NULL. */
static inline void add_raw(BjContext *ctx, const char *name, const char *path,
                           const char *event, int err_no, int once)
{
    char json[2048];
    BjError *err = NULL;
    int n;
    if (event) {
        n = snprintf(json, sizeof(json),
                 "{\"driver\":\"raw\",\"node-name\":\"%s\",\"file\":{"
                 "\"driver\":\"blkdebug\",\"node-name\":\"%s-dbg\","
                 "\"image\":{\"driver\":\"file\",\"filename\":\"%s\"},"
                 "\"inject-error\":[{\"event\":\"%s\",\"errno\":%d,\"once\":%s}]}}",
                 name, name, path, event, err_no, once ? "true" : "false");
    } else {
        n = snprintf(json, sizeof(json),
                 "{\"driver\":\"raw\",\"node-name\":\"%s\",\"file\":{"
                 "\"driver\":\"file\",\"filename\":\"%s\"}}",
                 name, path);
    }
    if (n >= (int)sizeof(json)) {
        FAIL("json too long");
    }
    CHECK(bj_blockdev_add(ctx, json, &err));
    CHECK_NO_ERR(err);
}

/* Compare two files byte for byte. */
static inline int files_equal(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int ca, cb, same = 1;
    CHECK(fa && fb);
    do {
        ca = fgetc(fa);
        cb = fgetc(fb);
        if (ca != cb) {
            same = 0;
            break;
        }
    } while (ca != EOF);
    fclose(fa);
    fclose(fb);
    return same;
}

/* ---- events -------------------------------------------------------------- */

/* The next queued event, waiting on the eventfd up to `timeout_ms`; NULL
 * on timeout. Free with bj_event_free. */
static inline BjEvent *next_event(BjContext *ctx, int timeout_ms)
{
    int fd = bj_event_queue_get_fd(ctx);
    BjEvent *ev;
    CHECK(fd >= 0);
    for (;;) {
        struct pollfd p;
        ev = bj_event_next(ctx);
        if (ev) {
            return ev;
        }
        p.fd = fd;
        p.events = POLLIN;
        p.revents = 0;
        if (poll(&p, 1, timeout_ms) <= 0) {
            return bj_event_next(ctx);
        }
        bj_event_queue_ack(ctx);
    }
}

/* A short form of an event: "JSC:running", "ERR(read,stop)", "READY",
 * "COMPLETED", "COMPLETED(Input/output error)", "CANCELLED", "PENDING",
 * "IOERR(write,stop)". */
static inline void summarize(const BjEvent *ev, char *out, size_t n)
{
    switch (ev->kind) {
    case BJ_EVENT_JOB_STATUS_CHANGE:
        snprintf(out, n, "JSC:%s", bj_job_status_str(ev->status));
        break;
    case BJ_EVENT_BLOCK_JOB_ERROR:
        snprintf(out, n, "ERR(%s,%s)", bj_io_operation_type_str(ev->operation),
                 bj_block_error_action_str(ev->action));
        break;
    case BJ_EVENT_BLOCK_IO_ERROR:
        snprintf(out, n, "IOERR(%s,%s)", bj_io_operation_type_str(ev->operation),
                 bj_block_error_action_str(ev->action));
        break;
    case BJ_EVENT_BLOCK_JOB_READY:
        snprintf(out, n, "READY");
        break;
    case BJ_EVENT_BLOCK_JOB_PENDING:
        snprintf(out, n, "PENDING");
        break;
    case BJ_EVENT_BLOCK_JOB_CANCELLED:
        snprintf(out, n, "CANCELLED");
        break;
    case BJ_EVENT_BLOCK_JOB_COMPLETED:
        if (ev->error) {
            snprintf(out, n, "COMPLETED(%s)", ev->error);
        } else {
            snprintf(out, n, "COMPLETED");
        }
        break;
    default:
        snprintf(out, n, "%s", ev->name);
    }
}

/* Collected short forms, joined by spaces. */
typedef struct {
    char text[4096];
    int count;
} Trace;

static inline void trace_add(Trace *t, const BjEvent *ev)
{
    char s[256];
    size_t len = strlen(t->text);
    summarize(ev, s, sizeof(s));
    snprintf(t->text + len, sizeof(t->text) - len, "%s%s", len ? " " : "", s);
    t->count++;
}

/* Take every queued event into `t` (waiting `ms` for stragglers). */
static inline void trace_drain(BjContext *ctx, Trace *t, int ms)
{
    BjEvent *ev;
    while ((ev = next_event(ctx, ms))) {
        trace_add(t, ev);
        bj_event_free(&ev);
    }
}

/* Collect events until JSC:null (or a 10 s silence). */
static inline void trace_until_null(BjContext *ctx, Trace *t)
{
    BjEvent *ev;
    while ((ev = next_event(ctx, 10000))) {
        int last = ev->kind == BJ_EVENT_JOB_STATUS_CHANGE && ev->status == BJ_JOB_STATUS_NULL;
        trace_add(t, ev);
        bj_event_free(&ev);
        if (last) {
            return;
        }
    }
    FAIL("no JSC:null; got: %s", t->text);
}

/* Collect events until BLOCK_JOB_READY. */
static inline void trace_until_ready(BjContext *ctx, Trace *t)
{
    BjEvent *ev;
    while ((ev = next_event(ctx, 10000))) {
        int ready = ev->kind == BJ_EVENT_BLOCK_JOB_READY;
        trace_add(t, ev);
        bj_event_free(&ev);
        if (ready) {
            return;
        }
    }
    FAIL("no READY; got: %s", t->text);
}

static inline int file_byte(const char *path, long long off)
{
    unsigned char c = 0;
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0);
    CHECK(pread(fd, &c, 1, off) == 1);
    close(fd);
    return c;
}

/* Drop whatever is queued (events of earlier cases). */
static inline void discard_events(BjContext *ctx)
{
    BjEvent *ev;
    bj_event_queue_ack(ctx);
    while ((ev = bj_event_next(ctx))) {
        bj_event_free(&ev);
    }
}

static inline BjContext *new_ctx(void)
{
    BjError *err = NULL;
    BjContext *ctx = bj_context_new(&err);
    CHECK_NO_ERR(err);
    CHECK(ctx);
    CHECK(bj_event_queue_enable(ctx, &err) >= 0);
    CHECK_NO_ERR(err);
    return ctx;
}

/* ---- a test job in the style of QEMU's test-blockjob.c ------------------- */

typedef struct {
    int should_converge;
    int should_complete;
    int fail_run;          /* run returns this -errno once it is non-zero */
    int prepare_ret;
    char calls[256];       /* "prepare commit clean ..." */
    int freed;
} TestJob;

static inline void tj_log(TestJob *s, const char *what)
{
    size_t len = strlen(s->calls);
    snprintf(s->calls + len, sizeof(s->calls) - len, "%s%s", len ? " " : "", what);
}

static inline int tj_run(BjJob *job, void *opaque, BjError **errp)
{
    TestJob *s = opaque;
    (void)errp;
    bj_job_progress_set_remaining(job, 100);
    while (!__atomic_load_n(&s->should_complete, __ATOMIC_SEQ_CST)) {
        int f = __atomic_load_n(&s->fail_run, __ATOMIC_SEQ_CST);
        if (bj_job_is_cancelled(job)) {
            return 0;
        }
        if (f) {
            return f;
        }
        if (__atomic_load_n(&s->should_converge, __ATOMIC_SEQ_CST) && !bj_job_is_ready(job)) {
            bj_job_progress_update(job, 100);
            bj_job_transition_to_ready(job, NULL);
        }
        bj_job_sleep_ns(job, 100000);
    }
    return 0;
}

static inline int tj_complete(BjJob *job, void *opaque, BjError **errp)
{
    TestJob *s = opaque;
    (void)job;
    (void)errp;
    __atomic_store_n(&s->should_complete, 1, __ATOMIC_SEQ_CST);
    return 0;
}

static inline int tj_prepare(BjJob *job, void *opaque)
{
    TestJob *s = opaque;
    (void)job;
    tj_log(s, "prepare");
    return s->prepare_ret;
}

static inline void tj_commit(BjJob *job, void *opaque)
{
    (void)job;
    tj_log(opaque, "commit");
}

static inline void tj_abort(BjJob *job, void *opaque)
{
    (void)job;
    tj_log(opaque, "abort");
}

static inline void tj_clean(BjJob *job, void *opaque)
{
    (void)job;
    tj_log(opaque, "clean");
}

static inline void tj_free(void *opaque)
{
    ((TestJob *)opaque)->freed++;
}

static inline BjJobDriver test_driver(void)
{
    BjJobDriver d;
    memset(&d, 0, sizeof(d));
    d.size = sizeof(d);
    d.job_type = BJ_JOB_TYPE_BACKUP;
    d.run = tj_run;
    d.complete = tj_complete;
    d.prepare = tj_prepare;
    d.commit = tj_commit;
    d.abort = tj_abort;
    d.clean = tj_clean;
    d.free = tj_free;
    return d;
}

/* ---- a copy job that treats errors like QEMU's mirror --------------------- */

#define CHUNK (1 << 20)
#define MAX_CHUNKS 64

typedef struct {
    BjNode *src, *dst;
    int on_source_error, on_target_error;
    int64_t len;
    int dirty[MAX_CHUNKS];
    int should_complete;
    char buf[CHUNK];
} CopyJob;

static inline int cj_all_clean(CopyJob *s, int nchunks)
{
    int i;
    for (i = 0; i < nchunks; i++) {
        if (s->dirty[i]) {
            return 0;
        }
    }
    return 1;
}

/* A failed request keeps its chunk dirty; `report` ends the job with the
 * error; `stop` has paused the job (the next pause point waits for
 * resume); `ignore` retries the chunk on a later pass. */
static inline int cj_run(BjJob *job, void *opaque, BjError **errp)
{
    CopyJob *s = opaque;
    int nchunks = (int)((s->len + CHUNK - 1) / CHUNK), i, r;
    (void)errp;
    for (i = 0; i < nchunks; i++) {
        s->dirty[i] = 1;
    }
    bj_job_progress_set_remaining(job, (uint64_t)s->len);
    for (;;) {
        bj_job_pause_point(job);
        if (bj_job_is_cancelled(job)) {
            return 0;
        }
        if (bj_block_job_get_iostatus(job) != BJ_BLOCK_DEVICE_IO_STATUS_OK) {
            /* Like mirror: no new copies while the iostatus is not ok. */
            bj_job_sleep_ns(job, 1000000);
            continue;
        }
        if (cj_all_clean(s, nchunks)) {
            if (!bj_job_is_ready(job)) {
                r = bj_node_flush(s->dst, NULL);
                if (r < 0) {
                    int a = bj_block_job_error_action(job, s->on_target_error, false, -r, NULL);
                    if (a == BJ_BLOCK_ERROR_ACTION_REPORT) {
                        return r;
                    }
                    continue;
                }
                bj_job_transition_to_ready(job, NULL);
            }
            if (__atomic_load_n(&s->should_complete, __ATOMIC_SEQ_CST) ||
                bj_job_cancel_requested(job)) {
                return 0;
            }
            bj_job_sleep_ns(job, 1000000);
            continue;
        }
        for (i = 0; i < nchunks; i++) {
            int64_t off = (int64_t)i * CHUNK;
            int64_t n = s->len - off < CHUNK ? s->len - off : CHUNK;
            if (!s->dirty[i]) {
                continue;
            }
            r = bj_node_pread(s->src, off, s->buf, n, NULL);
            if (r < 0) {
                int a = bj_block_job_error_action(job, s->on_source_error, true, -r, NULL);
                if (a == BJ_BLOCK_ERROR_ACTION_REPORT) {
                    return r;
                }
                break;
            }
            r = bj_node_pwrite(s->dst, off, s->buf, n, NULL);
            if (r < 0) {
                int a = bj_block_job_error_action(job, s->on_target_error, false, -r, NULL);
                if (a == BJ_BLOCK_ERROR_ACTION_REPORT) {
                    return r;
                }
                break;
            }
            s->dirty[i] = 0;
            bj_job_progress_update(job, (uint64_t)n);
            bj_block_job_ratelimit_processed_bytes(job, (uint64_t)n);
            bj_block_job_ratelimit_sleep(job);
        }
    }
}

static inline int cj_complete(BjJob *job, void *opaque, BjError **errp)
{
    CopyJob *s = opaque;
    (void)job;
    (void)errp;
    __atomic_store_n(&s->should_complete, 1, __ATOMIC_SEQ_CST);
    return 0;
}

/* Mirror's rule: before READY every cancel is a forced cancel. */
static inline bool cj_cancel(BjJob *job, bool force, void *opaque)
{
    (void)opaque;
    return force || !bj_job_is_ready(job);
}

static inline void cj_free(void *opaque)
{
    CopyJob *s = opaque;
    bj_node_unref(&s->src);
    bj_node_unref(&s->dst);
    free(s);
}

/* Create (not start) a copy job `id` from node src to node dst. */
static inline BjJob *copy_job_new(BjContext *ctx, const char *id, const char *src,
                                  const char *dst, int on_src, int on_tgt,
                                  int flags, BjError **errp)
{
    BjJobDriver d;
    BjJob *job;
    BjNode *dn;
    CopyJob *s = calloc(1, sizeof(*s));
    CHECK(s);
    memset(&d, 0, sizeof(d));
    d.size = sizeof(d);
    d.job_type = BJ_JOB_TYPE_MIRROR;
    d.run = cj_run;
    d.complete = cj_complete;
    d.cancel = cj_cancel;
    d.free = cj_free;
    s->src = bj_node_find(ctx, src, errp);
    s->dst = bj_node_find(ctx, dst, errp);
    s->on_source_error = on_src;
    s->on_target_error = on_tgt;
    if (s->src) {
        s->len = bj_node_get_length(s->src, NULL);
    }
    if (!s->src || !s->dst) {
        cj_free(s);
        return NULL;
    }
    dn = s->dst;
    job = bj_block_job_create(ctx, id, &d, NULL, src, 0, flags, s, errp);
    if (job) {
        CHECK(bj_block_job_add_bdrv(job, dn, NULL));
    }
    return job;
}

#endif
